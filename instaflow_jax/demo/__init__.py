"""The local web demo (``instaflow-demo``): engine.py holds the logic, app.py the Gradio page.

from instaflow_jax.demo import build_demo, load_engine

engine = load_engine("instaflow-0.9B", model2="2-rf")  # 2-RF: steps 1/2/4/8, guidance 1.5
engine.warm_up()  # compiles every size, batch and step count the page offers
build_demo(engine).launch(share=True)  # share=True: a public link (e.g. from Colab)
"""

from instaflow_jax.demo.app import build_demo
from instaflow_jax.demo.engine import DemoEngine, DemoInputError, DemoModel, load_engine

__all__ = ["DemoEngine", "DemoInputError", "DemoModel", "build_demo", "load_engine"]
