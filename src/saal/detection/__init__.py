"""Object detection: datasets of boxes (:mod:`saal.detection.data`), drawing them (:mod:`saal.detection.draw`).

The task itself is :class:`saal.tasks.detection.Detection`; the detectors are in
:mod:`saal.models.detectors`; SAAL's per-image perturbed loss for detectors in
:mod:`saal.sharpness.detection`; the strategies in ``saal.strategies.detection_*``.
"""
