"""Shared pytest setup: CPU platform and the persistent JAX compilation cache."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/vpns_jax/jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def proxy_weights(tmp_path_factory) -> str:
    """The proxy source model of test_experiment.small_config (Fashion-MNIST, width-0.25 ResNet-18,
    32 px, 40 steps), trained once per test session and shared by the end-to-end modules."""
    from test_experiment import FASHION, small_config

    from vpns_jax import proxy

    if not os.path.isdir(FASHION):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")
    path = str(tmp_path_factory.mktemp("proxy") / "proxy.safetensors")
    proxy.train_proxy(small_config(path), path)
    return path
