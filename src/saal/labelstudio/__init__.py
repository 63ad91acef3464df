"""``saal label-studio``: saal as a Label Studio ML backend that orders the tasks by saal and pre-labels them.

One module per job:

* :mod:`saal.labelstudio.labelconfig`: which label configs saal serves (one ``<Image>`` with ``<Choices>`` or
  ``<RectangleLabels>``) and their names and classes;
* :mod:`saal.labelstudio.client`: Label Studio's REST API over plain HTTP (tokens, tasks, images, predictions);
* :mod:`saal.labelstudio.store`: the backend's own store (projects, tasks, pushed model versions);
* :mod:`saal.labelstudio.predictions`: saal's order as prediction scores, classes and boxes as Label Studio results,
  annotations as labels;
* :mod:`saal.labelstudio.mirror`: one Label Studio project mirrored as a ``saal label`` project, kept ranked by the
  app's model job (:mod:`saal.app.model_job`), its rankings pushed back (:mod:`saal.labelstudio.push`);
* :mod:`saal.labelstudio.boxes`: the same for ``<RectangleLabels>``, with saal's detection task;
* :mod:`saal.labelstudio.backend`: the protocol (``/setup``, ``/predict``, ``/webhook``, ``/metrics``) without HTTP;
* :mod:`saal.labelstudio.server`: the FastAPI application serving it.

Everything here needs the ``labelstudio`` extra (``pip install 'saal[labelstudio]'``); Label Studio itself runs
apart (its own environment: ``pip install label-studio``).
"""
