"""Job configs (ml_collections ``get_config`` files) for ``--config=configs/NAME.py[:VARIANT]``.

Each file starts from the job's dataclass defaults (``configs/base.py``) and sets only the paper's
values that differ. They are loaded by path from any directory, and import each other by path
(``instaflow_jax.config_utils.load_sibling_config``), never through ``sys.path``.
"""
