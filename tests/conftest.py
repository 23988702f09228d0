import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
# The bench package; appended, so that an installed crossattn_gpu wins over the source folder.
sys.path.append(os.path.dirname(os.path.dirname(__file__)))

# Without an NVIDIA GPU, the Triton backend's tests run under Triton's interpreter on the CPU. The
# variable must be set before any kernel module is imported.
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
