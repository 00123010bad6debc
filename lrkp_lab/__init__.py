"""The lab kit: network namespaces, the demo, and what tests and benchmarks share with it.

Never shipped: the wheel and the .deb hold `lrkp_tsl` only. Importable from the checkout's
root (pytest's rootdir, `python -m lrkp_lab.demo`, `PYTHONPATH=.` for bench/).
"""
