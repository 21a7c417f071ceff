"""``python -m instaflow_jax.examples.toy`` = ``instaflow-toy``."""

from instaflow_jax.examples.toy.main import run

if __name__ == "__main__":
    run()
