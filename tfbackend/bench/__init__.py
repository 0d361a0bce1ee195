"""``tfbackend bench``: throughput (T1) and latency (T2) workloads against the hardware floor and HF peers.

``presets`` writes random-weight checkpoints of real shapes, ``workloads`` defines and runs the workloads on
tfbackend, ``peers`` runs them on Hugging Face ``generate`` and continuous batching, ``floor`` measures the
GPU and derives the time no implementation can beat, and ``report`` prints, saves and plots the results.
"""
