"""`encode_results` refuses bad inputs with an error naming the parameter and the value."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from inference.types import Location
from sr_writer.encode import SimilarCase, encode_results, render_pdf
from test_sr_writer_encode import make_inputs, make_source


@pytest.fixture(scope="module")
def source():
    return make_source(64)


@pytest.fixture(scope="module")
def inputs(source):
    return make_inputs(source, positive=True)


@pytest.mark.parametrize("change, message", [
    (lambda i, p: (i, dataclasses.replace(p, heatmap=np.zeros((32, 64), np.float32))), "prediction.heatmap shape"),
    (lambda i, p: (i, dataclasses.replace(p, heatmap=p.heatmap * 2)), r"prediction.heatmap values"),
    (lambda i, p: (i, dataclasses.replace(p, heatmap=p.heatmap.astype(np.uint8))), "prediction.heatmap must be a float"),
    (lambda i, p: (i, dataclasses.replace(p, probability=1.5)), r"prediction.probability .* got 1.5"),
    (lambda i, p: (i, dataclasses.replace(p, probability=float("nan"))), "prediction.probability"),
    (lambda i, p: (i, dataclasses.replace(p, uncertainty=-0.1)), "prediction.uncertainty"),
    (lambda i, p: (i, dataclasses.replace(p, location=None)), "prediction.location is None"),
    (lambda i, p: (i, dataclasses.replace(p, location=Location(10, 99, 3))), "outside the image"),
    (lambda i, p: (i, dataclasses.replace(p, location=Location(10, 10, 0))), "radius"),
    (lambda i, p: (i, dataclasses.replace(p, model=dataclasses.replace(p.model, weights_sha256="xyz"))),
     "weights_sha256"),
    (lambda i, p: (i, dataclasses.replace(p, model=dataclasses.replace(p.model, version=""))),
     "prediction.model.version"),
    (lambda i, p: (dataclasses.replace(i, display=i.display.astype(np.float32)), p), "image.display"),
    (lambda i, p: (dataclasses.replace(i, sop_instance_uid="1.2.3"), p), "image.sop_instance_uid '1.2.3'"),
])
def test_bad_prediction_or_image(source, inputs, change, message):
    image, prediction = change(*inputs)
    with pytest.raises(ValueError, match=message):
        encode_results(source, image, prediction, review=False)
    with pytest.raises(ValueError, match=message):
        render_pdf(source, image, prediction, review=False)


def test_source_without_study(source, inputs):
    broken = copy.deepcopy(source)
    del broken.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        encode_results(broken, *inputs, review=False)


def test_review_must_be_bool(source, inputs):
    with pytest.raises(TypeError, match="review"):
        encode_results(source, *inputs, review="yes")


def test_similar_cases_are_checked(source, inputs):
    with pytest.raises(ValueError, match=r"SimilarCase.similarity .* got 1.2"):
        SimilarCase("20240101", 0.5, None, 1.2)
    with pytest.raises(TypeError, match=r"similar_cases\[0\]"):
        encode_results(source, *inputs, review=False, similar_cases=[("20240101", 0.5, None, 0.9)])
