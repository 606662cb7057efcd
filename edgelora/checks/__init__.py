"""``edgelora check``: budget files (``budget``), measurements on the runtime (``measure``), saved
baselines (``baseline``), reports (``report``), and the run that ties them (``run``). Torch-free, so a
check runs on the device or a CI runner with only the runtime installed.
"""
