import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Without an NVIDIA GPU, the Triton backend's tests run under Triton's interpreter on the CPU. The
# variable must be set before any kernel module is imported.
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
