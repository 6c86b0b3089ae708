"""Self-GRPO: reinforcement learning of the policy on its own rollouts, rewarded by its own answers about them.

`likelihood` scores a rollout under a model (two estimates for masked diffusion), `objective` is GRPO's clipped,
KL-regularised loss, `reward` turns a reward spec and generated images into rewards, `trainer` runs it through
`dimoo train` when the run config has an ``rl:`` section. See docs/self_grpo.md.
"""
