"""Annotation formats -> one index of (file, label) and the class names.

    ann = load_annotations("k400/train.csv", root="k400/videos")       # format inferred: kinetics
    val = load_annotations("k400/validate.csv", root="k400/videos", classes=ann.classes)
    check_files(val, "--val-data")

Formats (`format=`; inferred from `data` when None: a folder -> folder, *.json -> ssv2, a CSV whose
header names youtube_id -> kinetics, any other file -> list):
  folder    data/class_name/<files>: one sub-folder per class, classes in sorted order; videos
            (.mp4 .avi .mkv .mov .webm) and images (.png .jpg .jpeg); hidden names (.ipynb_checkpoints,
            macOS ._ files) are skipped. A class folder without such files is an error naming it.
  list      one item a line, `path label` or CSV `path,label`; paths relative to `root` (default:
            the list file's folder; absolute paths are kept). The label is a 0-based integer
            (mmaction2, VideoMAE lists) or a class name; a line with a path only takes its class from
            the file's folder (UCF101's testlist). Blank lines and lines starting with # are skipped.
            Integer labels are named after their files' folder when each label has one folder (the
            UCF101 layout), else by the number. A training list (no `classes`) whose integer labels
            leave a class without items is refused: shift a 1-based list (UCF101's trainlist) to 0.
  kinetics  the Kinetics CSV `label,youtube_id,time_start,time_end,split` (header first, any column
            order); the file of a row is root/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4 (root
            default: the CSV's folder); classes are the CSV's labels, sorted.
  ssv2      Something-Something v2: the train or validation JSON, with labels.json beside it
            ({"Holding something next to something": "27", ...}); an entry's class is its template
            with the brackets removed ("Holding [something] next to [something]"); files are
            root/{id}.webm (root default: the JSON's folder); classes ordered by labels.json's ids.

Images for joint image + video training: `load_images(data)`, a folder (image files only) or a list;
`merge_label_spaces(videos, images)` puts both in one label space.

`classes` forces the label space (validation data must use the training classes): names not in it
are an error. Every bad input is one ValueError line naming the file (and the line) at fault.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Sequence

from tubevit_fast.io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

FORMATS = ("folder", "list", "kinetics", "ssv2")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
_SHOWN_MISSING = 5  # missing files named in check_files' message


@dataclasses.dataclass
class Annotations:
    samples: list[tuple[str, int]]      # (absolute file path, label)
    classes: list[str]                  # label -> class name

    def __len__(self) -> int:
        return len(self.samples)


def infer_format(data) -> str:
    """The format `data` is in (see the module docstring)."""
    data = os.fspath(data)
    if os.path.isdir(data):
        return "folder"
    if not os.path.isfile(data):
        raise ValueError(f"{data}: no such file or folder")
    if data.lower().endswith(".json"):
        return "ssv2"
    if data.lower().endswith(".csv"):
        try:
            with open(data, newline="") as f:
                header = next(csv.reader(f), [])
        except UnicodeDecodeError:
            raise ValueError(f"{data}: not a text file (a CSV annotation file is UTF-8 text)") from None
        if "youtube_id" in [h.strip() for h in header]:
            return "kinetics"
    return "list"


def load_annotations(data, format: str | None = None, root=None, classes: Sequence[str] | None = None,
                     extensions: Sequence[str] = MEDIA_EXTENSIONS) -> Annotations:
    """The index of `data` in `format` (see the module docstring); `extensions`: the files a folder
    dataset takes."""
    data = os.fspath(data)
    if format is None:
        format = infer_format(data)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "folder":
        if not os.path.isdir(data):
            raise ValueError(f"{data}: not a folder (the folder format is data/class_name/<files>)")
    elif not os.path.isfile(data):
        raise ValueError(f"{data}: no such {format} annotation file")
    if root is None:
        root = data if format == "folder" else os.path.dirname(os.path.abspath(data))
    root = os.path.abspath(os.fspath(root))
    classes = None if classes is None else list(classes)
    try:
        if format == "folder":
            ann = _folder(data, classes, tuple(e.lower() for e in extensions))
        elif format == "list":
            ann = _list(data, root, classes)
        elif format == "kinetics":
            ann = _kinetics(data, root, classes)
        else:
            ann = _ssv2(data, root, classes)
    except UnicodeDecodeError:
        raise ValueError(f"{data}: not a text file (a {format} annotation file is UTF-8 text)") from None
    if not ann.samples:
        raise ValueError(f"{data}: holds no items")
    return ann


def load_images(data, format: str | None = None, root=None) -> Annotations:
    """The images of joint image + video training: a folder (image files only) or a list of images
    (see the module docstring); a listed file that is not an image is an error."""
    if format not in (None, "folder", "list"):
        raise ValueError(f"images come from a folder or a list, not the {format} format")
    ann = load_annotations(data, format, root, extensions=IMAGE_EXTENSIONS)
    for path, _ in ann.samples:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"{os.fspath(data)}: {path} is not an image ({' '.join(IMAGE_EXTENSIONS)})")
    return ann


def _label_of(name: str, classes: list[str], where: str) -> int:
    try:
        return classes.index(name)
    except ValueError:
        raise ValueError(f"{where}: class {name!r} is not one of the {len(classes)} classes "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})") from None


def _folder(data: str, classes: list[str] | None, extensions: tuple[str, ...]) -> Annotations:
    found = sorted(d.name for d in os.scandir(data) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"{data}: has no class sub-folders (the folder format is data/class_name/<files>)")
    names = found if classes is None else classes
    samples = []
    for name in found:
        folder = os.path.join(data, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(extensions) and not f.startswith("."))
        if not files:
            raise ValueError(f"{folder}: empty class folder (no {' '.join(extensions)} files)")
        label = _label_of(name, names, folder)
        samples += [(os.path.abspath(os.path.join(folder, f)), label) for f in files]
    return Annotations(samples, list(names))


def _split_line(line: str) -> list[str]:
    if "," in line:
        return [part.strip() for part in next(csv.reader([line]))]
    return line.rsplit(None, 1)


def _list(data: str, root: str, classes: list[str] | None) -> Annotations:
    rows = []  # (path, label text or None, line number)
    with open(data, newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = _split_line(line)
            if number == 1 and len(parts) == 2 and parts[1].lower() == "label":
                continue  # a CSV header
            if len(parts) > 2 or not parts[0]:
                raise ValueError(f"{data}:{number}: expected 'path label' or 'path,label', got {line!r}")
            rows.append((parts[0], parts[1] if len(parts) == 2 else None, number))
    if not rows:
        raise ValueError(f"{data}: holds no items")
    integer = [label is not None and label.lstrip("-").isdigit() for _, label, _ in rows]
    if any(integer) and not all(integer):
        number = rows[integer.index(not integer[0])][2]
        raise ValueError(f"{data}:{number}: labels mix integers and class names (or missing labels)")
    paths = [os.path.join(root, path) for path, _, _ in rows]
    if all(integer):
        labels = [int(label) for _, label, _ in rows]
        return Annotations(list(zip(paths, labels)), _integer_classes(data, rows, labels, paths, classes))
    names = [label if label is not None else os.path.basename(os.path.dirname(path))
             for (path, label, _), path in zip(rows, paths)]
    for (_, label, number), name in zip(rows, names):
        if not name:
            raise ValueError(f"{data}:{number}: no label, and the path has no folder to take a class from")
    if classes is None:
        classes = sorted(set(names))
    labels = [_label_of(name, classes, f"{data}:{number}") for name, (_, _, number) in zip(names, rows)]
    return Annotations(list(zip(paths, labels)), classes)


def _integer_classes(data: str, rows, labels: list[int], paths: list[str], classes: list[str] | None) -> list[str]:
    """Class names for a list with integer labels (see the module docstring)."""
    for (_, _, number), label in zip(rows, labels):
        if label < 0 or (classes is not None and label >= len(classes)):
            limit = f" (there are {len(classes)} classes)" if classes is not None else ""
            raise ValueError(f"{data}:{number}: label {label} out of range{limit}")
    if classes is not None:
        return classes
    count = max(labels) + 1
    missing = sorted(set(range(count)) - set(labels))
    if missing:
        raise ValueError(f"{data}: labels are 0-based class numbers, but {len(missing)} of 0..{count - 1} have no "
                         f"item ({', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                         f"shift a 1-based list (UCF101's trainlist) down by one")
    folders: dict[int, set[str]] = {}
    for label, path in zip(labels, paths):
        folders.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
    names = [next(iter(folders[c])) if len(folders[c]) == 1 else "" for c in range(count)]
    if all(names) and len(set(names)) == count:
        return names
    return [str(c) for c in range(count)]


def _kinetics(data: str, root: str, classes: list[str] | None) -> Annotations:
    with open(data, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in KINETICS_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{data}: a Kinetics CSV needs the columns {','.join(KINETICS_COLUMNS)},split; "
                             f"missing {','.join(missing)}")
        reader.fieldnames = header
        rows = []
        for number, row in enumerate(reader, 2):
            try:
                label = row["label"].strip()
                name = f"{row['youtube_id'].strip()}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{data}:{number}: expected label,youtube_id,time_start,time_end with integer "
                                 f"times, got {','.join(str(v) for v in row.values())!r}") from None
            if not label or not row["youtube_id"].strip():
                raise ValueError(f"{data}:{number}: no label or youtube_id (a test-split CSV has no labels)")
            rows.append((os.path.join(root, name), label, number))
    if classes is None:
        classes = sorted({label for _, label, _ in rows})
    return Annotations([(path, _label_of(label, classes, f"{data}:{number}")) for path, label, number in rows],
                       classes)


def _ssv2(data: str, root: str, classes: list[str] | None) -> Annotations:
    labels_file = os.path.join(os.path.dirname(os.path.abspath(data)), "labels.json")
    if not os.path.isfile(labels_file):
        raise ValueError(f"{data}: Something-Something v2 needs labels.json beside it, not found: {labels_file}")
    label_ids = _read_json(labels_file)
    try:
        by_id = sorted((int(i), name) for name, i in label_ids.items())
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{labels_file}: expected {{class name: id, ...}} with integer ids") from None
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise ValueError(f"{labels_file}: the ids must be 0..{len(by_id) - 1}, each once")
    if classes is None:
        classes = [name for _, name in by_id]
    entries = _read_json(data)
    if not isinstance(entries, list):
        raise ValueError(f"{data}: expected a JSON list of videos [{{\"id\", \"template\", ...}}, ...]")
    samples = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            raise ValueError(f"{data}: entry {n} has no id or template (the test-split JSON has no labels)")
        name = str(entry["template"]).replace("[", "").replace("]", "")
        samples.append((os.path.join(root, f"{entry['id']}.webm"), _label_of(name, classes, f"{data}: entry {n}")))
    return Annotations(samples, classes)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def check_files(annotations: Annotations, what: str = "--data") -> None:
    """ValueError naming the first few missing files and how many are missing."""
    missing = [path for path, _ in annotations.samples if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        raise ValueError(f"{what}: {len(missing)} of {len(annotations.samples)} files are missing: {shown}")


def merge_label_spaces(videos: Annotations, images: Annotations) -> tuple[Annotations, Annotations]:
    """One label space for joint image + video training: the video classes, then the image classes
    they lack (a name both have is one class). Returns (videos, images relabelled), both with it."""
    classes = list(videos.classes) + [c for c in images.classes if c not in videos.classes]
    relabel = [classes.index(c) for c in images.classes]
    return (Annotations(list(videos.samples), classes),
            Annotations([(path, relabel[label]) for path, label in images.samples], classes))
