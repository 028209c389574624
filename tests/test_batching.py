"""Generation in batches that fit: a batch that runs out of memory is halved and retried, the
rest goes on at the smaller size, and the images are those of any other batching."""

import pytest
import torch

from erase.batching import fitting_batches, generation_batch_size
from erase.concepts import resolve_concept
from erase.data import DataConfig, build_concept_data
from erase.models import load_backend


def out_of_memory():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_batch_out_of_memory_is_halved_and_the_rest_goes_on_smaller():
    tried = []

    def run(start, stop):
        tried.append(stop - start)
        if stop - start > 3:
            raise out_of_memory()
        return list(range(start, stop))

    batches = list(fitting_batches(10, 8, run))
    assert tried == [8, 4, 2, 2, 2, 2, 2]
    assert [result for _, _, result in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_other_errors_and_a_batch_of_one_out_of_memory_are_raised():
    def broken(start, stop):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        list(fitting_batches(4, 4, broken))

    def never_fits(start, stop):
        raise out_of_memory()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(fitting_batches(4, 4, never_fits))


def test_default_generation_batch():
    assert generation_batch_size(None, torch.device("cpu")) == 8
    assert generation_batch_size(None, torch.device("cuda")) == 32
    assert generation_batch_size(3, torch.device("cuda")) == 3


def test_generated_set_survives_out_of_memory_with_the_same_images(tiny_sd_dir, tmp_path):
    concept = resolve_concept("nudity", conditioning="text")

    def generate(cache, gen_batch_size, fail_above=None):
        backend = load_backend(tiny_sd_dir)
        real, sizes = backend.sample, []

        def sample(conditions, seeds, **settings):
            sizes.append(len(conditions))
            if fail_above and len(conditions) > fail_above:
                raise out_of_memory()
            return real(conditions, seeds, **settings)

        backend.sample = sample
        config = DataConfig(
            num_forget=5, num_retain=1, gen_steps=2, gen_batch_size=gen_batch_size,
            cache_dir=str(tmp_path / cache),
        )  # fmt: skip
        return build_concept_data(backend, concept, config).forget_images, sizes

    squeezed, sizes = generate("a", 8, fail_above=2)
    assert sizes[:5] == [5, 4, 2, 2, 1]  # forget set: 5 fails, 4 fails, then pairs
    one_by_one, _ = generate("b", 1)
    assert squeezed.shape == one_by_one.shape == (5, 3, 16, 16)
    torch.testing.assert_close(squeezed, one_by_one, rtol=0, atol=1 / 255)
