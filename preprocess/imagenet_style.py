"""mini-ImageNet, tiered-ImageNet, CIFAR-FS and CUB from the archives researchers download.

All four are folders of natural RGB images, one folder per class, inside one archive; they
differ only in the archive's name and layout, the split rule and the image size:

* mini_imagenet: `mini_imagenet_full_size.tar.bz2` holding
  `mini_imagenet_full_size/{train,val,test}/CLASS/*.jpg`; split = the archive's folders
  (Ravi & Larochelle), 64 / 16 / 20 classes of 600 images.
* tiered_imagenet: `tiered_imagenet.tar` holding `tiered_imagenet/{train,val,test}/CLASS/*`;
  split = the archive's folders (Ren et al.), 351 / 97 / 160 classes.
* CIFAR_FS: `cifar100.zip` holding `cifar100/data/CLASS/*.png` and
  `cifar100/splits/bertinetto/{train,val,test}.txt` (one class name per line); split = those
  files (Bertinetto et al.), 64 / 16 / 20 classes of 600 images.
* CUB: `CUB_200_2011.tgz` holding `CUB_200_2011/images/CLASS/*.jpg`; split = sort the 200
  class folder names, index i goes to train if i % 2 == 0, val if i % 4 == 1, test if
  i % 4 == 3 (100 / 50 / 50 classes, 11,788 images).

Output images are 84x84 RGB (32x32 RGB for CIFAR-FS), made as the official CxGrad loader
makes them at load time: a Pillow BICUBIC resize to the square size without cropping, then
`convert('RGB')` (utils.dataset_format.CXGRAD_RESIZE); an image already that size is only
converted. Source images of any size are accepted. The recipe is recorded in the manifest's
"settings", so a build made with another one (before: convert, then LANCZOS) is rebuilt. See
preprocess/images.py for which files are copied unchanged and for the rule on files that are
not images.

The class counts above are checked only as a warning, so that small archives with the same
layout (tests, a custom subset) build too; what is always checked is the split structure:
all three splits present and non-empty, no class in two splits, and every class a CIFAR-FS
split file names present in the archive. The counts are in the manifest's "splits".

Source lookup: `--source DIR` if given (only there), otherwise `DEST/NAME_raw/`. These
archives have no stable public download URL, so nothing is downloaded; a missing archive
is an error that says where to get it. Extraction goes through `archives.safe_extract`
into a temporary folder (under TMPDIR, default /tmp, which needs room for the extracted
archive), never next to the source, which may be read-only.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.archives import PreprocessError, safe_extract
from preprocess.images import BadImages, ImageFormat, convert_classes
from utils.dataset_format import CXGRAD_RESIZE, SPLITS, classes_in_two_splits

ClassFolders = dict[str, dict[str, Path]]  # split -> {class name: extracted class folder}


@dataclass(frozen=True)
class ArchiveDataset:
    """One dataset that is built from a single archive of class folders.

    `find_classes(extract_root, archive)` reads the extracted archive and returns, per split,
    the class folders to convert; it raises PreprocessError if the layout is not the expected one.
    """

    name: str
    archive: str
    download_hint: str
    image_size: int
    official_classes: dict[str, int]
    split_rule: str
    find_classes: Callable[[Path, Path], ClassFolders]

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat(self.image_size, self.image_size, "RGB", CXGRAD_RESIZE)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W), as every shape in code (utils/dataset_format.py)."""
        return (3, self.image_size, self.image_size)

    @property
    def settings(self) -> dict[str, Any]:
        """What determines the output besides the archive itself; compared on re-runs."""
        return {
            "split_rule": self.split_rule,
            "resize": f"{CXGRAD_RESIZE.describe((self.image_size, self.image_size), 'RGB')}, without cropping; "
                      f"JPEG/PNG files already {self.image_size}x{self.image_size} RGB are copied unchanged",
        }


def locate_archive(dataset: ArchiveDataset, source: Path | None, dest: Path) -> dict[str, Path]:
    """{archive name: path}, from `source` if given, otherwise from DEST/NAME_raw/."""
    raw_dir = dest / f"{dataset.name}_raw"
    folder = source if source is not None else raw_dir
    path = folder / dataset.archive
    if not path.is_file():
        raise PreprocessError(
            f"{dataset.name}: {dataset.archive} not found in {folder}. This archive has no stable download URL, "
            f"so it is not downloaded automatically: get {dataset.archive} from {dataset.download_hint}, "
            f"put it in a folder DIR and run: python preprocess/preprocess.py --datasets {dataset.name} --source DIR "
            f"(or put it in {raw_dir} and leave out --source)")
    return {dataset.archive: path}


def write_splits(dataset: ArchiveDataset, archives: dict[str, Path], out_dir: Path,
                 skip_bad_images: bool = False) -> list[dict[str, str]]:
    """Extract the archive into a temporary folder and write `out_dir/SPLIT/CLASS/*`.

    Returns the files skipped as unreadable images (empty unless `skip_bad_images`).
    """
    archive = archives[dataset.archive]
    with tempfile.TemporaryDirectory(prefix=f"{dataset.name}-extract-") as extract_dir:
        extract_root = Path(extract_dir)
        print(f"{dataset.name}: extracting {archive} into {extract_root}", flush=True)
        started = time.perf_counter()
        safe_extract(archive, extract_root)
        classes = dataset.find_classes(extract_root, archive)
        _check_splits(dataset, classes, archive)
        counts = {split: len(classes[split]) for split in SPLITS}
        print(f"{dataset.name}: extracted in {time.perf_counter() - started:.1f}s; classes per split: {counts}",
              flush=True)
        if counts != dataset.official_classes:
            print(f"{dataset.name}: warning: {archive} has {counts} classes per split, the official archive has "
                  f"{dataset.official_classes}; building anyway (expected for a custom or test archive)", flush=True)

        jobs = [(folder, out_dir / split / class_name)
                for split in SPLITS for class_name, folder in sorted(classes[split].items())]
        bad_images = BadImages(dataset.name, extract_root, [archive], skip_bad_images)
        convert_classes(jobs, dataset.image_format, bad_images)
        return bad_images.skipped


def _check_splits(dataset: ArchiveDataset, classes: ClassFolders, archive: Path) -> None:
    """Refuse a split without classes and a class that lies in two splits."""
    empty = [split for split in SPLITS if not classes[split]]
    if empty:
        raise PreprocessError(f"{dataset.name}: {archive} has no classes in split(s) {', '.join(empty)}; "
                              f"is it the archive from {dataset.download_hint}?")
    overlap = classes_in_two_splits(classes)
    if overlap:
        split, later, shared = overlap
        raise PreprocessError(f"{dataset.name}: {archive} puts class(es) {', '.join(shared[:5])} "
                              f"in both {split} and {later}; a class must be in one split only")


def _class_folders(folder: Path, extract_root: Path, archive: Path, dataset: str) -> dict[str, Path]:
    """{name: path} of the class folders in `folder`, which must exist; other entries are reported and ignored.

    A stray file next to the class folders (a README, .DS_Store) belongs to no class, so
    leaving it out changes nothing; files inside class folders follow the bad-file rule.
    """
    member = folder.relative_to(extract_root).as_posix()
    if not folder.is_dir():
        raise PreprocessError(f"{dataset}: {archive} does not contain the folder {member}/; "
                              f"is it the right archive?")
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            classes[entry.name] = entry
        else:
            print(f"{dataset}: ignoring {member}/{entry.name}: not a class folder", flush=True)
    return classes


def _split_folders(top: str, dataset: str) -> Callable[[Path, Path], ClassFolders]:
    """Layout TOP/{train,val,test}/CLASS/: the archive's own split (mini- and tiered-ImageNet)."""
    def find_classes(extract_root: Path, archive: Path) -> ClassFolders:
        return {split: _class_folders(extract_root / top / split, extract_root, archive, dataset)
                for split in SPLITS}
    return find_classes


def _read_split_file(path: Path, extract_root: Path, archive: Path) -> list[str]:
    if not path.is_file():
        raise PreprocessError(f"CIFAR_FS: {archive} does not contain the split file "
                              f"{path.relative_to(extract_root).as_posix()}; is it the MetaOptNet cifar100.zip?")
    return sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})


def _cifar_fs_classes(extract_root: Path, archive: Path) -> ClassFolders:
    """cifar100/data/CLASS/ split by the class lists in cifar100/splits/bertinetto/SPLIT.txt."""
    data = _class_folders(extract_root / "cifar100" / "data", extract_root, archive, "CIFAR_FS")
    split_dir = extract_root / "cifar100" / "splits" / "bertinetto"
    classes: ClassFolders = {}
    for split in SPLITS:
        names = _read_split_file(split_dir / f"{split}.txt", extract_root, archive)
        missing = [name for name in names if name not in data]
        if missing:
            raise PreprocessError(f"CIFAR_FS: cifar100/splits/bertinetto/{split}.txt in {archive} names "
                                  f"{len(missing)} class(es) without a folder in cifar100/data/: "
                                  f"{', '.join(missing[:5])}")
        classes[split] = {name: data[name] for name in names}
    unused = sorted(data.keys() - {name for split_classes in classes.values() for name in split_classes})
    if unused:
        print(f"CIFAR_FS: {len(unused)} class(es) in cifar100/data/ are in no split file and left out: "
              f"{', '.join(unused[:5])}", flush=True)
    return classes


def _cub_split(class_names: list[str]) -> dict[str, list[str]]:
    """The CUB split rule: sort the class folder names; index i goes to train if i % 2 == 0,
    to val if i % 4 == 1 and to test if i % 4 == 3 (100 / 50 / 50 of the 200 classes)."""
    ordered = sorted(class_names)
    return {"train": ordered[0::2], "val": ordered[1::4], "test": ordered[3::4]}


def _cub_classes(extract_root: Path, archive: Path) -> ClassFolders:
    """CUB_200_2011/images/CLASS/, split by `_cub_split`."""
    folders = _class_folders(extract_root / "CUB_200_2011" / "images", extract_root, archive, "CUB")
    return {split: {name: folders[name] for name in names} for split, names in _cub_split(list(folders)).items()}


DATASETS: dict[str, ArchiveDataset] = {dataset.name: dataset for dataset in (
    ArchiveDataset(
        name="mini_imagenet",
        archive="mini_imagenet_full_size.tar.bz2",
        download_hint="the Google Drive link in the README of the MAML++ repository "
                      "(https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch)",
        image_size=84,
        official_classes={"train": 64, "val": 16, "test": 20},
        split_rule="the archive's mini_imagenet_full_size/{train,val,test}/ folders (Ravi & Larochelle split)",
        find_classes=_split_folders("mini_imagenet_full_size", "mini_imagenet"),
    ),
    ArchiveDataset(
        name="tiered_imagenet",
        archive="tiered_imagenet.tar",
        download_hint="the tiered-ImageNet release in class folders linked from the MetaOptNet "
                      "(https://github.com/kjunelee/MetaOptNet) and FEAT (https://github.com/Sha-Lab/FEAT) READMEs",
        image_size=84,
        official_classes={"train": 351, "val": 97, "test": 160},
        split_rule="the archive's tiered_imagenet/{train,val,test}/ folders (Ren et al. split)",
        find_classes=_split_folders("tiered_imagenet", "tiered_imagenet"),
    ),
    ArchiveDataset(
        name="CIFAR_FS",
        archive="cifar100.zip",
        download_hint="the CIFAR-FS link in the README of the MetaOptNet repository "
                      "(https://github.com/kjunelee/MetaOptNet)",
        image_size=32,
        official_classes={"train": 64, "val": 16, "test": 20},
        split_rule="cifar100/splits/bertinetto/{train,val,test}.txt (Bertinetto et al. split)",
        find_classes=_cifar_fs_classes,
    ),
    ArchiveDataset(
        name="CUB",
        archive="CUB_200_2011.tgz",
        download_hint="the Caltech-UCSD Birds-200-2011 page https://www.vision.caltech.edu/datasets/cub_200_2011/",
        image_size=84,
        official_classes={"train": 100, "val": 50, "test": 50},
        split_rule="sorted CUB_200_2011/images/ class folders; index i: i % 2 == 0 train, i % 4 == 1 val, "
                   "i % 4 == 3 test",
        find_classes=_cub_classes,
    ),
)}
