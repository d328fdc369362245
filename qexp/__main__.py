"""`python -m qexp ...`: the same as the `qexp` command (qexp/app.py).

The Hydra task lives in qexp.app, an importable module, so launchers that run jobs in other
processes (joblib, Ray, submitit) import it there instead of pickling `__main__`.
"""

from qexp.app import main

if __name__ == "__main__":
    main()
