"""Controls for a finished ``instaflow-toy`` run (evaluation noise, matched budget, fidelity,
guidance sweep): ``python benchmarks/toy_controls.py --workdir runs/toy --seeds 100 101``.

The code is ``instaflow_jax/examples/toy/controls.py`` (see its docstring and ``--help``).
"""

from __future__ import annotations

from instaflow_jax.examples.toy.controls import main

if __name__ == "__main__":
    main()
