"""Multi-device checks, run in a subprocess that owns N simulated CPU devices (see test_parallel.py).

    python tests/parallel_checks.py '{"devices": 8, "stage": "sparse", "meshes": [{"data": 8}, ...]}'

For every mesh: the loss and the gradients of one step on the tiny config (fp32) against the
1-device values, the sharding of every parameter and gradient against the rules, and one full
sharded train step (loss and updated parameters) against the 1-device step. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys


COMPARED_METRICS = ("lm_loss", "accuracy", "indexer_kl", "captured_mass", "captured_mass_p10", "k90", "kl_rows",
                    "mtp_loss", "mtp_accuracy", "mtp_indexer_kl")


def main(job: dict) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", job["devices"])
    import numpy as np

    from dsa_train.config import load_config
    from dsa_train.parallel import activate, make_mesh, resolve_rules
    from dsa_train.parallel.sharding import batch_sharding, replicated, sharding_report
    from dsa_train.parallel.state import init_train_state, jit_train_step
    from dsa_train.train import step as step_lib
    from dsa_train.train.optim import make_optimizer

    stage = job.get("stage", "sparse")
    overrides = [f"train.stage={stage}", f"train.batch_size={job.get('batch', 8)}",
                 f"train.seq_len={job.get('seq', 32)}", "model.index_topk=8", "train.diagnostic_rows=4",
                 "model.compute_dtype=float32", "model.kernels=reference", "train.main.lr=1e-2",
                 "train.indexer.lr=1e-2", *job.get("overrides", [])]
    results = {"meshes": []}

    def run(mesh_sizes: dict, devices):
        sizes = {"data": 1, **mesh_sizes}
        cfg = load_config("configs/tiny.yaml", overrides + [f"mesh.{k}={v}" for k, v in sizes.items()])
        mesh = make_mesh(cfg.mesh, devices)
        rules = resolve_rules(cfg.mesh.rules)
        opt = {g: make_optimizer(getattr(cfg.train, g), cfg.train.steps) for g in step_lib.GROUPS}
        txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
        t = cfg.train
        with activate(mesh, rules, remat=t.remat, expert_capacity=cfg.mesh.expert_capacity):
            graphdef, state, shardings = init_train_state(cfg, txs, mesh, rules)
            mode = step_lib.forward_mode(cfg)
            trained_groups = step_lib.TRAINABLE[t.stage]
            rng = np.random.default_rng(0)
            seg = np.ones((t.batch_size, t.seq_len), np.int32)
            seg[:, t.seq_len // 2:] = 2
            seg[0, -5:] = 0
            tokens = np.where(seg > 0, rng.integers(4, cfg.model.vocab_size, seg.shape), 0).astype(np.int32)
            batch = {"tokens": tokens, "segment_ids": seg, "loss_weights": (seg > 0).astype(np.float32)}
            bsh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
            batch = {k: jax.device_put(v, bsh) for k, v in batch.items()}

            def loss_and_grads(state, batch):
                trained = {g: state.params[g] for g in trained_groups}
                frozen = {g: p for g, p in state.params.items() if g not in trained_groups}
                fn = lambda tr: step_lib._loss_and_metrics(graphdef, cfg, mode, tr, frozen,  # noqa: E731
                                                           state.router_bias, batch)
                (loss, (metrics, counts)), grads = jax.value_and_grad(fn, has_aux=True)(trained)
                return loss, counts, grads

            grad_sh = {g: shardings.params[g] for g in trained_groups}
            lg = jax.jit(loss_and_grads, in_shardings=(shardings, bsh),
                         out_shardings=(replicated(mesh), replicated(mesh), grad_sh))
            loss, counts, grads = lg(state, batch)
            step = jit_train_step(step_lib.make_train_step(graphdef, cfg, txs, scheds, mode), shardings, mesh,
                                  rules, t.batch_size, t.seq_len, donate=False)
            new_state, metrics = step(state, batch)
        report = sharding_report(state.params, mesh, rules)
        return dict(cfg=cfg, mesh=mesh, rules=rules, loss=loss, counts=counts, grads=grads, state=state,
                    new_state=new_state, metrics=metrics, report=report)

    devices = jax.devices()
    if "memory" in job:  # compile only: XLA's per-device memory of the step for each (mesh, seq_len)
        from dsa_train.parallel.plan import compile_memory

        for entry in job["memory"]:
            sizes = {"data": 1, **entry["mesh"]}
            cfg = load_config("configs/tiny.yaml", overrides + [f"mesh.{k}={v}" for k, v in sizes.items()]
                              + [f"train.seq_len={entry['seq']}", *entry.get("overrides", [])])
            mesh = make_mesh(cfg.mesh, devices[: int(np.prod(list(sizes.values())))])
            mem = compile_memory(cfg, mesh, resolve_rules(cfg.mesh.rules))
            results["meshes"].append({"mesh": sizes, "seq": entry["seq"], **mem})
            print("MEMORY " + json.dumps(results["meshes"][-1]), flush=True)
        return results
    ref = run({"data": 1}, devices[:1])
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)  # noqa: E731
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    ref_grads, ref_params = flat(ref["grads"]), flat(ref["new_state"].params)
    for sizes in job["meshes"]:
        try:
            out = run(sizes, devices[: int(np.prod(list(sizes.values())))])
        except Exception as e:  # report and go on with the other meshes
            import traceback

            traceback.print_exc()
            results["meshes"].append({"mesh": sizes, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            continue
        grads, params = flat(out["grads"]), flat(out["new_state"].params)
        grad_err = max(float(np.max(np.abs(grads[k] - ref_grads[k])) / (np.max(np.abs(ref_grads[k])) + 1e-12))
                       for k in ref_grads)
        param_err = max(float(np.max(np.abs(params[k] - ref_params[k]))) for k in ref_params)
        # Every parameter, gradient and optimizer moment is sharded as the rules say.
        from flax import nnx

        from dsa_train.parallel.rules import spec_for

        wrong, checked, named = [], 0, {}
        trees = [("param", out["state"].params), ("grad", out["grads"]), ("opt", out["state"].opt)]
        for name, tree in trees:
            for path, var in jax.tree_util.tree_flatten_with_path(
                    tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
                if not isinstance(var, nnx.Variable) or not var.get_metadata().get("axes"):
                    continue
                value = var.get_value()
                want_spec = spec_for(var.get_metadata()["axes"], value.shape, out["mesh"], out["rules"])
                checked += 1
                if value.sharding.spec != want_spec:
                    wrong.append(f"{name} {jax.tree_util.keystr(path)}: {value.sharding.spec} != {want_spec}")
                if name == "param":
                    named[jax.tree_util.keystr(path)] = str(value.sharding.spec)
        results["meshes"].append({
            "mesh": sizes,
            "loss": float(out["loss"]), "ref_loss": float(ref["loss"]),
            "grad_rel_err": grad_err, "param_err": param_err,
            "step_loss": float(out["metrics"]["loss"]), "ref_step_loss": float(ref["metrics"]["loss"]),
            "counts_equal": bool(np.array_equal(np.asarray(out["counts"]), np.asarray(ref["counts"]))),
            # The step's other metrics (indexer diagnostics on sampled rows included): max |difference|.
            "metric_err": {k: float(np.max(np.abs(np.asarray(out["metrics"][k]) - np.asarray(ref["metrics"][k]))))
                           for k in COMPARED_METRICS if k in ref["metrics"]},
            "wrong_shardings": wrong[:5], "checked_shardings": checked,
            "sharded_params": sum(1 for _, _, s, _ in out["report"] if any(e is not None for e in s)),
            "specs": named,
        })
        print("MESH " + json.dumps(results["meshes"][-1]), flush=True)
    return results


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
