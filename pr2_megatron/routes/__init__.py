"""Routes: the route table, its files, its collectives, and the route path from rollout to replay.

* :class:`RoutePath` (``path``): the public route path any training loop drives -- gather a
  pass's routes into one table on every rank, hand each training forward its targets in any
  layout, name tokens for the predictor's feature cache;
* :class:`RouteTable` (``table``): a rollout batch's routes packed per token, smallest dtype;
* ``files``: safetensors files with a SHA-256; ``engine``: vLLM / SGLang ``routed_experts``;
* ``gather``: the collectives (one per micro-batch); ``targets``: table -> a forward's targets;
* ``packed``: packed (THD) micro-batches -- per-sequence CP split, alignment padding.
"""

from pr2_megatron.routes.engine import from_engine_routed_experts
from pr2_megatron.routes.files import load_route_table, save_route_table
from pr2_megatron.routes.gather import gather_route_table
from pr2_megatron.routes.packed import PackedMicroBatch, thd_partitioned_indices
from pr2_megatron.routes.path import KEY_STRIDE, MicroBatch, RouteGroups, RoutePath, token_keys
from pr2_megatron.routes.table import RouteTable, route_dtype
from pr2_megatron.routes.targets import context_parallel_positions, micro_batch_targets

__all__ = [
    "KEY_STRIDE",
    "MicroBatch",
    "PackedMicroBatch",
    "RouteGroups",
    "RoutePath",
    "RouteTable",
    "context_parallel_positions",
    "from_engine_routed_experts",
    "gather_route_table",
    "load_route_table",
    "micro_batch_targets",
    "route_dtype",
    "save_route_table",
    "thd_partitioned_indices",
    "token_keys",
]
