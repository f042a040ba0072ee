"""The SimPy model of offloaded MoE decoding: copy engines, the GPU expert cache, the compute
stream, driven by the shared controller in ``policies``."""
from hardware import HardwareProfile, available_hardware, load_hardware
from sim.replay import replay_untimed
from sim.simulator import SimResult, SimSettings, Timeline, simulate

__all__ = ["HardwareProfile", "SimResult", "SimSettings", "Timeline", "available_hardware",
           "load_hardware", "replay_untimed", "simulate"]
