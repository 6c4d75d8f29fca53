"""Create the train state directly sharded, and jit the train step against the mesh.

Nothing is ever materialized on one device: the state's shapes come from ``jax.eval_shape``, its
shardings from the rules, and the initializer runs under ``jax.jit(..., out_shardings=...)`` so
each device only computes (and holds) its own shards.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from dsa_train.config import Config
from dsa_train.parallel.rules import Rules
from dsa_train.parallel.sharding import abstract_with_shardings, batch_sharding, replicated, tree_shardings


def _init_fn(config: Config, optimizers: dict) -> Callable[[], Any]:
    from dsa_train.model import create_model
    from dsa_train.train import step as step_lib

    def init():
        model = create_model(config.model, seed=config.train.seed)
        _, params, router_bias = step_lib.split_model(model)
        return step_lib.init_state(config, params, router_bias, optimizers)

    return init


def model_graphdef(config: Config):
    from dsa_train.model import create_model
    from dsa_train.train import step as step_lib

    return step_lib.split_model(nnx.eval_shape(lambda: create_model(config.model, seed=config.train.seed)))[0]


def abstract_train_state(config: Config, optimizers: dict, mesh: Mesh, rules: Rules):
    """(abstract state with shardings, shardings): no arrays are allocated."""
    shapes = jax.eval_shape(_init_fn(config, optimizers))
    shardings = tree_shardings(shapes, mesh, rules)
    return abstract_with_shardings(shapes, shardings), shardings


def init_train_state(config: Config, optimizers: dict, mesh: Mesh, rules: Rules):
    """(graphdef, state, state shardings) with every array created in place on its devices."""
    shapes = jax.eval_shape(_init_fn(config, optimizers))
    shardings = tree_shardings(shapes, mesh, rules)
    state = jax.jit(_init_fn(config, optimizers), out_shardings=shardings)()
    return model_graphdef(config), state, shardings


def reinit_optimizer(config: Config, params: dict, router_bias, optimizers: dict, shardings):
    """A fresh TrainState (step 0, new optimizer state) around given parameters, sharded like
    ``shardings`` (used when a stage starts from another run's model). ``params`` and
    ``router_bias`` are donated."""
    from dsa_train.train import step as step_lib

    init = lambda p, b: step_lib.init_state(config, p, b, optimizers)  # noqa: E731
    # Donated: the parameters become the new state's without a second copy on the devices (the
    # caller's arrays are consumed).
    return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(params, router_bias)


def jit_train_step(train_step: Callable, state_shardings, mesh: Mesh, rules: Rules, batch_size: int,
                   seq_len: int, donate: bool = True):
    """``jax.jit`` of ``train_step(state, batch)`` with explicit in/out shardings (metrics
    replicated); the state argument is donated."""
    batch = batch_sharding(mesh, rules, batch_size, seq_len)
    return jax.jit(train_step, in_shardings=(state_shardings, batch),
                   out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
