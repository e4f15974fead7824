"""Test support for the GPGPU provider agent, kept out of the shipped package.

- fake_nvml: a fake NVIDIA driver beneath pynvml, so tests run the real collector without a GPU;
- owner_usage: simulated GPU owners who come and go, fitted to real duty-cycle traces;
- sim: a simulated machine (fake GPUs and their owners) for `gpgpu-agent run --simulate`.

It lives beside gpgpu_agent in the agent's source tree and is importable from an editable
install (`pip install -e ./agent`, as the demo and the tests use) or with the tree's agent/
folder on PYTHONPATH. The wheel providers install (`pip install ./agent`) does not contain it:
a provider's machine has real GPUs and no use for a fake driver.
"""
