"""The hardware-profile format: what the engine measures and the simulator reads (copy cost against
size, compute per model shape and precision, host overheads). Both clocks import it; neither owns it."""
from hardware.profile import (HardwareProfile, HardwareProfileError, available_hardware, hardware_from_dict,
                              hardware_to_dict, load_hardware)

__all__ = ["HardwareProfile", "HardwareProfileError", "available_hardware", "hardware_from_dict",
           "hardware_to_dict", "load_hardware"]
