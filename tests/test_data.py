"""Task sources: class splits, the episodic sampler, unlabeled pools, built-in data files."""

from __future__ import annotations

import pytest
import torch

from robust_meta.data import (
    ClassSplits,
    Task,
    TaskSampler,
    UnlabeledPool,
    digits_splits,
    load_digits,
    load_tensor_dataset,
    split_classes,
)


def coded_dataset(class_ids, per_class, *, size=4):
    """Images whose constant pixel value encodes their row index (to trace every draw back)."""
    labels = torch.tensor(class_ids).repeat_interleave(per_class)
    m = len(labels)
    images = (torch.arange(m, dtype=torch.float64) / (m - 1)).view(m, 1, 1, 1).expand(m, 1, size, size).clone()
    return images, labels


def rows_of(images, x):
    m = len(images)
    return torch.round(x[:, 0, 0, 0] * (m - 1)).long()


# --------------------------------------------------------------------------- split_classes


def test_split_classes_disjoint_complete_and_seeded():
    labels = torch.arange(20).repeat(3)  # 20 classes, 3 examples each
    s = split_classes(labels, seed=1)
    assert isinstance(s, ClassSplits) and tuple(map(len, s)) == (12, 4, 4)
    assert not set(s.train) & set(s.val) and not set(s.train) & set(s.test) and not set(s.val) & set(s.test)
    assert sorted(s.train + s.val + s.test) == list(range(20))
    assert all(isinstance(c, int) for c in s.train) and s.train == sorted(s.train)
    assert split_classes(labels, seed=1) == s
    assert split_classes(labels, seed=2) != s
    train, val, test = s  # unpacks like a tuple
    assert s._asdict() == {"train": train, "val": val, "test": test}


def test_split_classes_rounding_and_counts_by_hand():
    # 10 × (0.6, 0.2, 0.2) = (6, 2, 2) exactly
    assert tuple(map(len, split_classes(list(range(10))))) == (6, 2, 2)
    # 7 × (0.5, .25, .25) = (3.5, 1.75, 1.75): floors (3, 1, 1), two left go to the largest remainders
    assert tuple(map(len, split_classes(list(range(7)), fractions=(0.5, 0.25, 0.25)))) == (3, 2, 2)
    s = split_classes(torch.tensor([5, 9, 11, 30, 31, 40, 41]), counts=(2, 2, 2), seed=0)
    assert tuple(map(len, s)) == (2, 2, 2)
    assert set(s.train + s.val + s.test) < {5, 9, 11, 30, 31, 40, 41}  # one class unused


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(fractions=(0.5, 0.2, 0.2)), ValueError, "summing to 1"),
        (dict(fractions=(1.0, 0.0, 0.0)), ValueError, "3 positive numbers"),
        (dict(counts=(3, 3, 5)), ValueError, "ask for 11 classes but labels hold only 10"),
        (dict(counts=(3, 3)), ValueError, "3 numbers"),
        (dict(counts=(3, 0, 3)), ValueError, "counts\\[i\\] must be >= 1"),
    ],
)
def test_split_classes_errors(kw, err, match):
    with pytest.raises(err, match=match):
        split_classes(torch.arange(10), **kw)


def test_split_classes_too_few_classes_and_bad_labels():
    with pytest.raises(ValueError, match="too few for fractions"):
        split_classes([0, 1])
    with pytest.raises(TypeError, match="integer class ids"):
        split_classes(torch.rand(5))


# --------------------------------------------------------------------------- digits


def test_load_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    counts = images * 16  # sklearn stores pixel counts 0..16
    assert torch.equal(counts, counts.round())
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.bincount(labels).min() >= 170


def test_digits_splits_support_3_way_everywhere():
    s = digits_splits(seed=0)
    assert tuple(map(len, s)) == (4, 3, 3)
    assert sorted(s.train + s.val + s.test) == list(range(10))
    assert digits_splits(seed=0) == s and digits_splits(seed=1) != s
    images, labels = load_digits()
    for classes in s:
        task = TaskSampler(images, labels, ways=3, shots=1, queries=15, classes=classes).sample(1)[0]
        assert set(task.classes.tolist()) <= set(classes)


# --------------------------------------------------------------------------- TaskSampler


def test_sampler_shapes_labels_and_real_classes():
    images, labels = coded_dataset([3, 7, 11, 20, 42], 6)
    sampler = TaskSampler(images, labels, ways=3, shots=2, queries=3, classes=[3, 11, 20, 42])
    for task in sampler.sample(10):
        assert isinstance(task, Task)
        assert task.support_x.shape == (6, 1, 4, 4) and task.query_x.shape == (9, 1, 4, 4)
        assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]
        assert task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert task.classes.dtype == torch.long and len(set(task.classes.tolist())) == 3
        assert set(task.classes.tolist()) <= {3, 11, 20, 42}  # never class 7
        s_rows, q_rows = rows_of(images, task.support_x), rows_of(images, task.query_x)
        # every image of relative label i really is of class classes[i]
        assert torch.equal(labels[s_rows], task.classes[task.support_y])
        assert torch.equal(labels[q_rows], task.classes[task.query_y])
        assert not set(s_rows.tolist()) & set(q_rows.tolist())  # support and query disjoint
        assert task.unlabeled is None


def test_label_permutation_varies_across_tasks():
    images, labels = coded_dataset([0, 1, 2], 4)
    tasks = TaskSampler(images, labels, ways=3, shots=1, queries=1, seed=0).sample(40)
    mappings = {tuple(t.classes.tolist()) for t in tasks}
    assert len(mappings) >= 4  # of the 3! = 6 label permutations of the same 3 classes
    # real class 0 gets relative label 0, 1 and 2 in different tasks
    assert {t.classes.tolist().index(0) for t in tasks} == {0, 1, 2}


def test_sampler_is_deterministic_and_leaves_global_rng_alone():
    images, labels = coded_dataset(list(range(6)), 5)

    def stream(seed):
        return TaskSampler(images, labels, ways=3, shots=1, queries=2, unlabeled=3, seed=seed).sample(5)

    state = torch.get_rng_state()
    a, b, c = stream(0), stream(0), stream(1)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a, b):
        for f in ("support_x", "support_y", "query_x", "query_y", "unlabeled", "classes"):
            assert torch.equal(getattr(x, f), getattr(y, f))
    assert any(not torch.equal(x.support_x, y.support_x) for x, y in zip(a, c))
    sampler = TaskSampler(images, labels, ways=3, shots=1, queries=2, seed=4)
    first = sampler.sample(3)
    sampler.reset()
    assert all(torch.equal(x.query_x, y.query_x) for x, y in zip(first, sampler.sample(3)))


def test_batches_and_iteration_continue_the_same_stream():
    images, labels = coded_dataset(list(range(5)), 4)
    ref = TaskSampler(images, labels, ways=2, shots=1, queries=1, seed=9).sample(7)
    sampler = TaskSampler(images, labels, ways=2, shots=1, queries=1, seed=9)
    batches = sampler.batches(3)
    b1, b2 = next(batches), next(batches)
    assert len(b1) == 3 and len(b2) == 3
    it = iter(sampler)
    got = b1 + b2 + [next(it)]
    assert all(torch.equal(x.support_x, y.support_x) and torch.equal(x.classes, y.classes) for x, y in zip(ref, got))


def test_unlabeled_from_the_dataset_are_of_the_task_classes_and_unused():
    images, labels = coded_dataset([10, 11, 12, 13, 14, 15], 8)
    sampler = TaskSampler(images, labels, ways=3, shots=1, queries=2, unlabeled=7, seed=0)
    for task in sampler.sample(8):
        rows = rows_of(images, task.unlabeled)
        assert task.unlabeled.shape == (7, 1, 4, 4)
        assert set(labels[rows].tolist()) == set(task.classes.tolist())
        # spread evenly: 7 = 3 + 2 + 2 over the classes in label order
        assert [int((labels[rows] == c).sum()) for c in task.classes.tolist()] == [3, 2, 2]
        used = set(rows_of(images, task.support_x).tolist()) | set(rows_of(images, task.query_x).tolist())
        assert not used & set(rows.tolist())


def test_unlabeled_pool_is_keyed_by_real_class_ids():
    """Real ids 10..14 behind labels 0..2: a pool indexed by relative labels would be wrong."""
    images, labels = coded_dataset([10, 11, 12, 13, 14], 4)
    pool_keys = torch.tensor([10, 11, 12, 13, 14, 0, 1, 2]).repeat_interleave(5)  # decoys keyed 0..2
    pool_images = torch.rand(len(pool_keys), 1, 4, 4)
    pool_images[:, 0, 0, 0] = torch.arange(len(pool_keys)) / (len(pool_keys) - 1)
    pool = UnlabeledPool(pool_images, keys=pool_keys)
    sampler = TaskSampler(images, labels, ways=3, shots=1, queries=1, unlabeled=6, unlabeled_pool=pool)
    for task in sampler.sample(10):
        drawn = pool_keys[rows_of(pool_images, task.unlabeled)]
        assert sorted(drawn.tolist()) == sorted(task.classes.tolist() * 2)
        assert not set(drawn.tolist()) & {0, 1, 2}
    with pytest.raises(ValueError, match="real class ids, not the task's relative labels"):
        UnlabeledPool(pool_images[:25], keys=pool_keys[:25]).draw(3, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="class 10 has 5 unlabeled images in the pool, 6 were asked"):
        pool.draw(6, classes=[10])


def test_unlabeled_pool_without_keys_draws_at_random_without_replacement():
    pool_images = (torch.arange(30, dtype=torch.float32) / 29).view(30, 1, 1, 1)
    pool = UnlabeledPool(pool_images)
    g = torch.Generator().manual_seed(0)
    x = pool.draw(12, classes=[3, 4], generator=g)  # classes ignored without keys
    rows = torch.round(x.flatten() * 29).long().tolist()
    assert len(x) == 12 and len(set(rows)) == 12
    assert torch.equal(pool.draw(12, generator=torch.Generator().manual_seed(0)), x)
    assert not torch.equal(pool.draw(12, generator=torch.Generator().manual_seed(1)), x)
    with pytest.raises(ValueError, match="cannot draw 31 images from a pool of 30"):
        pool.draw(31)
    with pytest.raises(ValueError, match="one entry per image"):
        UnlabeledPool(pool_images, keys=[1, 2])


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(ways=4, classes=[0, 1, 2]), ValueError, "ways=4 is more than the 3 classes"),
        (dict(shots=3, queries=3), ValueError, r"fewer images than shots \+ queries = 3 \+ 3 = 6: class 1: 5"),
        (dict(unlabeled=6, queries=2), ValueError, r"unlabeled per class = 1 \+ 2 \+ 3 = 6: class 1: 5"),
        (dict(classes=[0, 99]), ValueError, r"classes \[99\] have no image"),
        (dict(ways=0), ValueError, "ways must be >= 1"),
        (dict(shots=1.0), TypeError, "shots must be an int"),
        (dict(unlabeled_pool="pool"), TypeError, "UnlabeledPool"),
    ],
)
def test_sampler_validation(kw, err, match):
    images, labels = coded_dataset([0, 1, 2, 3], 6)
    labels[labels == 1] = torch.tensor([1, 1, 1, 1, 1, 0])  # class 1 has only 5 images
    args = dict(ways=2, shots=1, queries=1) | kw
    with pytest.raises(err, match=match):
        TaskSampler(images, labels, **args)


def test_sampler_rejects_images_outside_unit_range_and_bad_shapes():
    images, labels = coded_dataset([0, 1], 3)
    with pytest.raises(ValueError, match=r"\[0, 1\].*inside the model"):
        TaskSampler(images * 255, labels, ways=2, shots=1, queries=1)
    with pytest.raises(TypeError, match="divide uint8 by 255"):  # uint8 is fine; other integers are not
        TaskSampler((images * 255).to(torch.int32), labels, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="differ in length"):
        TaskSampler(images, labels[:-1], ways=2, shots=1, queries=1)


# --------------------------------------------------------------------------- tensor files


def test_load_tensor_dataset_roundtrip_and_conversions(tmp_path):
    images = torch.rand(6, 3, 5, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.save({"images": images, "labels": labels}, tmp_path / "d.pt")
    x, y = load_tensor_dataset(tmp_path / "d.pt")
    assert torch.equal(x, images) and torch.equal(y, labels) and y.dtype == torch.int64
    grey = torch.randint(0, 256, (4, 7, 7), dtype=torch.uint8)
    torch.save({"images": grey, "labels": torch.arange(4)}, tmp_path / "g.pt")
    x, _ = load_tensor_dataset(str(tmp_path / "g.pt"))
    assert x.shape == (4, 1, 7, 7) and torch.equal(x[:, 0], grey.float() / 255)


class _NotATensor:
    pass


def test_load_tensor_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tensor_dataset(tmp_path / "missing.pt")
    torch.save({"x": torch.rand(2, 1, 2, 2)}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="keys 'images' and 'labels'"):
        load_tensor_dataset(tmp_path / "k.pt")
    torch.save({"images": torch.rand(2, 1, 2, 2) + 1, "labels": torch.arange(2)}, tmp_path / "r.pt")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_tensor_dataset(tmp_path / "r.pt")
    torch.save({"images": torch.rand(3, 1, 2, 2), "labels": torch.arange(2)}, tmp_path / "n.pt")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_tensor_dataset(tmp_path / "n.pt")
    torch.save({"images": _NotATensor(), "labels": torch.arange(2)}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="weights_only=True"):  # arbitrary pickles are refused
        load_tensor_dataset(tmp_path / "p.pt")


def test_uint8_images_are_sampled_as_the_float_images_would_be():
    """A uint8 split (a benchmark's memory-mapped images) stays uint8; each task is float / 255,
    equal to the tasks a float copy of the split gives, seed for seed."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (40, 3, 5, 5), generator=g, dtype=torch.uint8)
    labels = torch.arange(8).repeat_interleave(5)
    a = TaskSampler(raw, labels, ways=3, shots=1, queries=2, unlabeled=3, seed=7)
    b = TaskSampler(raw.float() / 255, labels, ways=3, shots=1, queries=2, unlabeled=3, seed=7)
    assert a.images.dtype == torch.uint8
    for ta, tb in zip(a.sample(5), b.sample(5)):
        for name in ("support_x", "query_x", "unlabeled"):
            x, y = getattr(ta, name), getattr(tb, name)
            assert x.dtype == torch.float32 and torch.equal(x, y)
        assert torch.equal(ta.classes, tb.classes) and torch.equal(ta.query_y, tb.query_y)
