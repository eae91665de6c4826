"""Expert parallelism on torch.distributed: each of W ranks holds E/W experts
of every MoE layer; tokens travel to their experts with all_to_all_single."""
from .comm import all_to_all
from .expert_parallel import (
                              ShardedExperts,
                              expert_parallel,
                              gather_state_dict,
                              is_expert_param,
                              shard_state_dict,
                              sync_gradients,
)

__all__ = ["all_to_all", "ShardedExperts", "expert_parallel", "gather_state_dict", "is_expert_param",
           "shard_state_dict", "sync_gradients"]
