"""emgd: a daemon that turns a 16-channel, 2 kHz surface-EMG wristband into computer input.

The package is import-safe: importing it configures no logging, starts no threads and
imports no optional transport (bleak, pyserial) or heavy runtime (numba, onnxruntime).
"""

__version__ = "0.1.0"

N_CHANNELS = 16
SAMPLE_RATE = 2000

__all__ = ["N_CHANNELS", "SAMPLE_RATE", "__version__"]
