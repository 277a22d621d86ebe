"""The whole quantfx pipeline on real data, in a minute or two on a laptop CPU.

    python -m quantfx.demo            # Fashion-MNIST if installed, else scikit-learn's digits
    quantfx demo --dataset digits     # the same through the console entry point

`pipeline` runs the stages and prints the table; `model` is the small CNN and its training.
"""

from quantfx.demo.model import DemoNet, train_epochs
from quantfx.demo.pipeline import (
    DESCRIPTION,
    DemoResult,
    add_arguments,
    main,
    run_demo,
    run_from_arguments,
)

__all__ = ["DESCRIPTION", "DemoNet", "DemoResult", "add_arguments", "main", "run_demo",
           "run_from_arguments", "train_epochs"]
