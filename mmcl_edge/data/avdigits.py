"""AV-Digits: FSDD spoken digits paired with scikit-learn's handwritten digit images.

Each clip is paired with an image of the same digit (seeded); train and test images are disjoint.
class-IL: 5 tasks of 2 digits. domain-IL: 3 tasks = speaker groups, and each task's images get
their own shift (rotation, contrast, noise), so both modalities drift.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcl_edge.data.dataset import MultiModalDataset, Scenario, class_incremental_tasks, domain_incremental_tasks
from mmcl_edge.data.fsdd import locate_fsdd, read_fsdd
from mmcl_edge.errors import DataFormatError
from mmcl_edge.preprocess import PreprocessSpec

SPEAKER_GROUPS = (("george", "jackson"), ("lucas", "nicolas"), ("theo", "yweweler"))
TEST_IMAGES_PER_DIGIT = 30


def image_shift(img: np.ndarray, domain: int, rng: np.random.Generator) -> np.ndarray:
    """The image domain of a domain-IL task: 0 clean, 1 rotated + low contrast, 2 noisy + blurred."""
    from scipy import ndimage

    img = img.astype(np.float32)
    if domain == 1:
        img = ndimage.rotate(img, 30.0, reshape=False, order=1, mode="constant") * 0.5 + 4.0
    elif domain == 2:
        img = ndimage.gaussian_filter(img, 0.6) + rng.normal(0.0, 2.5, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 16.0)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (images ``[1797, 8, 8]`` float64 0..16, targets), read
    from the CSV scikit-learn ships, as its ``load_digits`` reads it. Without importing
    scikit-learn: that import (and SciPy's with it) kept 79 MB resident in the learner."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DataFormatError("AV-Digits needs scikit-learn's digit images: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a scikit-learn that keeps the file elsewhere: its own loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def load_avdigits(setting: str = "class-il", data_dir=None, seed: int = 0) -> Scenario:
    clips = read_fsdd(locate_fsdd(data_dir))
    images, targets = load_digit_images()
    rng = np.random.default_rng(seed)
    train_imgs, test_imgs = {}, {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        test_imgs[c], train_imgs[c] = idx[:TEST_IMAGES_PER_DIGIT], idx[TEST_IMAGES_PER_DIGIT:]
    group_of = {s: g for g, names in enumerate(SPEAKER_GROUPS) for s in names}

    def build(split_clips, pool):
        used = {c: 0 for c in range(10)}
        audio, image, y, dom = [], [], [], []
        for clip in split_clips:
            c = clip.digit
            img = images[pool[c][used[c] % len(pool[c])]]
            used[c] += 1
            d = group_of.get(clip.speaker, 0)
            if setting == "domain-il":
                img = image_shift(img, d, rng)
            audio.append(clip.wave)
            image.append(np.asarray(img, dtype=np.float32))
            y.append(c)
            dom.append(d)
        return MultiModalDataset({"audio": audio, "image": image}, np.array(y), np.array(dom))

    order = rng.permutation(len(clips))
    train = build([clips[i] for i in order if clips[i].index >= 5], train_imgs)
    test = build([clips[i] for i in order if clips[i].index < 5], test_imgs)
    specs = {"audio": PreprocessSpec("audio", sample_rate=8000), "image": PreprocessSpec("image")}
    if setting == "class-il":
        tasks = class_incremental_tasks(train.y, test.y, 2, seed)
    else:
        names = {g: "speakers " + "+".join(s) for g, s in enumerate(SPEAKER_GROUPS)}
        tasks = domain_incremental_tasks(train.y, train.domain, test.domain, names)
    name = "avdigits-cil" if setting == "class-il" else "avdigits-dil"
    return Scenario(name, setting, train, test, specs, tasks, [str(c) for c in range(10)])
