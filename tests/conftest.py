import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
# The bench package; appended, so that an installed crossattn_gpu wins over the source folder.
sys.path.append(os.path.dirname(os.path.dirname(__file__)))

# Without an NVIDIA GPU, the Triton backend's tests run under Triton's interpreter on the CPU. The
# variable must be set before any kernel module is imported.
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The interpreter computes float32 dots in IEEE float32 whatever precision they ask for; this makes
    # TF32 and tf32x3 dots round as tensor cores do, so that their accuracy is tested here too.
    import tensor_cores

    try:
        tensor_cores.emulate()
    except ImportError:  # no triton here: its tests skip
        pass
