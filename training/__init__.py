"""nilmc.training: reproducible training of the reference models (apart from the compiler: it compiles
models, whoever trained them). ``nilmc train`` is its command-line face."""

if __name__ != "nilmc.training":  # a bare-folder import would load a second copy of every nilmc class
    raise ImportError(f"{__name__!r} is a folder of nilmc, not a package of its own: import nilmc.training instead "
                      "(install nilmc with `pip install -e .`; importing the bare folder would create a second copy of its classes)")

from nilmc.training.seq2point import TrainConfig, save_trained, train_seq2point  # noqa: E402

__all__ = ["TrainConfig", "save_trained", "train_seq2point"]
