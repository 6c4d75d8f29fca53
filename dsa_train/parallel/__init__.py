"""Scale-out: device mesh, logical-axis sharding rules, sharded state and step, expert and context
parallelism, remat, and the memory/step-time planner (``dsa-train plan``).

Entry points:
- ``make_mesh(config.mesh)``, ``data_shard(mesh)`` (mesh.py), ``resolve_rules(config.mesh.rules)`` (rules.py);
- ``init_train_state`` / ``jit_train_step`` (state.py), ``put_batch`` (sharding.py);
- ``activate(mesh, rules, remat=...)`` (scope.py): the scope the model's hooks consult.
"""

from dsa_train.parallel.mesh import MeshError, data_shard, make_mesh
from dsa_train.parallel.rules import DEFAULT_RULES, MESH_AXES, resolve_rules, spec_for
from dsa_train.parallel.scope import activate, constrain, current

__all__ = ["DEFAULT_RULES", "MESH_AXES", "MeshError", "activate", "constrain", "current", "data_shard",
           "make_mesh", "resolve_rules", "spec_for"]
