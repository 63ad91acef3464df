"""Reading a Label Studio label config: which tags saal can serve, their names and their classes.

saal serves one ``<Image>`` with either one ``<Choices>`` (single choice: classification) or one
``<RectangleLabels>`` (boxes) pointing at it. Anything else (several control tags, polygons, text, audio,
``choice="multiple"``) is refused with one line that names the supported tags.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from saal.errors import SaalError

CHOICES, BOXES = "choices", "rectanglelabels"
SUPPORTED = (
    "one <Image> with one <Choices> (single choice: classification) or one <RectangleLabels> (boxes) on it, "
    'e.g. <View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    '<Choice value="cat"/><Choice value="dog"/></Choices></View>'
)
_CONTROL_TAGS = {
    "choices",
    "rectanglelabels",
    "labels",
    "polygonlabels",
    "keypointlabels",
    "brushlabels",
    "ellipselabels",
    "textarea",
    "rating",
    "number",
    "taxonomy",
    "rectangle",
    "polygon",
    "keypoint",
    "brush",
    "ellipse",
    "pairwise",
    "ranker",
    "datetime",
    "relations",
    "videorectangle",
    "timeserieslabels",
    "paragraphlabels",
    "hypertextlabels",
}
_OBJECT_TAGS = {"image", "text", "hypertext", "audio", "video", "timeseries", "paragraphs", "table", "pdf", "html"}
_CLASS_NAME = re.compile(r"^[^\s,/\\][^,/\\]{0,63}$")  # what saal label accepts as a class name


class UnsupportedConfig(SaalError):
    """A label config with tags saal cannot serve (the message names the supported ones)."""


@dataclass(frozen=True)
class LabelConfig:
    """What saal needs from a label config.

    Attributes:
        kind: :data:`CHOICES` or :data:`BOXES`.
        from_name: the control tag's ``name`` (a prediction's ``from_name``).
        to_name: the ``<Image>`` tag's ``name`` (a prediction's ``to_name``).
        data_key: the task data field holding the image URL (``$image`` -> ``image``).
        classes: the class names, in the config's order.
    """

    kind: str
    from_name: str
    to_name: str
    data_key: str
    classes: tuple[str, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def parse(xml: str | None) -> LabelConfig:
    """Return the :class:`LabelConfig` of the label config ``xml``.

    Raises:
        UnsupportedConfig: not XML, or tags saal cannot serve (one line naming the supported ones).
    """
    if not xml or not xml.strip():
        raise UnsupportedConfig(f"the project has no label config; saal serves {SUPPORTED}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise UnsupportedConfig(f"the label config is not XML ({error}); saal serves {SUPPORTED}") from None
    nodes = list(root.iter())
    controls = [n for n in nodes if _local(n.tag) in _CONTROL_TAGS]
    objects = [n for n in nodes if _local(n.tag) in _OBJECT_TAGS]
    names = sorted({n.tag for n in controls + objects})
    described = ", ".join(f"<{n}>" for n in names) or "no labelling tags"
    images = [n for n in objects if _local(n.tag) == "image"]
    if len(controls) != 1 or len(objects) != 1 or len(images) != 1:
        raise UnsupportedConfig(f"the label config has {described}; saal serves {SUPPORTED}")
    control, image = controls[0], images[0]
    kind = _local(control.tag)
    if kind not in (CHOICES, BOXES):
        raise UnsupportedConfig(f"the label config has <{control.tag}>; saal serves {SUPPORTED}")
    if kind == CHOICES and control.get("choice", "single").lower() == "multiple":
        raise UnsupportedConfig(f'the label config has <Choices choice="multiple">; saal serves {SUPPORTED}')
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig(f'the <Image> tag needs value="$field" (it has {value!r}); saal serves {SUPPORTED}')
    if control.get("toName") != image.get("name"):
        raise UnsupportedConfig(
            f"<{control.tag}> points at toName={control.get('toName')!r}, not the <Image> {image.get('name')!r}"
        )
    child = "choice" if kind == CHOICES else "label"
    classes = tuple(str(c.get("value") or c.get("alias") or "") for c in control if _local(c.tag) == child)
    _check_classes(classes, control.tag, kind)
    return LabelConfig(kind, str(control.get("name")), str(image.get("name")), value[1:], classes)


def _check_classes(classes: tuple[str, ...], tag: str, kind: str) -> None:
    least = 2 if kind == CHOICES else 1
    if len(classes) < least:
        raise UnsupportedConfig(f"<{tag}> has {len(classes)} classes; saal needs at least {least}")
    bad = [c for c in classes if not _CLASS_NAME.match(c)]
    if bad:
        raise UnsupportedConfig(
            f"class {bad[0]!r} of <{tag}> is not a name saal can keep: use up to 64 characters without / \\ or commas"
        )
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UnsupportedConfig(f"class {repeated[0]!r} is named twice in <{tag}>")
