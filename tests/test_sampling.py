import numpy as np
import pytest

from sw.contract.errors import ConfigError
from sw.sampling import Sampler, SamplingParams


def test_greedy_takes_first_maximum():
    assert Sampler(SamplingParams())(np.array([0.0, 3.0, 3.0, 1.0])) == 1


def test_top_k_one_is_greedy_and_seed_reproducible():
    logits = np.random.default_rng(0).standard_normal(100)
    assert Sampler(SamplingParams(temperature=1.0, top_k=1))(logits) == int(np.argmax(logits))

    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s(logits) for _ in range(20)]
    assert draws(7) == draws(7) and draws(7) != draws(8)


def test_top_p_restricts_to_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    draws = {s(logits) for _ in range(300)}
    assert draws == {0, 1}


def test_temperature_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_parameters(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
