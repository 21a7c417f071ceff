"""Job configs (ml_collections ``get_config`` files) for ``--config=configs/NAME.py[:VARIANT]``.

Each file starts from the job's dataclass defaults (``configs/base.py``) and sets only the paper's
values that differ. The files import each other as modules of this package (``from configs import
base``); loaded by path from any directory, they first put the repository root on ``sys.path``.
"""
