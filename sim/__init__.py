"""The SimPy clock: offloaded MoE decoding in virtual time (copy engines, the GPU expert cache, the
compute stream), driven through the shared core ``offload``; and the untimed replay."""
from sim.replay import replay_untimed
from sim.simulator import SimResult, Timeline, simulate

__all__ = ["SimResult", "Timeline", "replay_untimed", "simulate"]
