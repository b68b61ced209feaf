"""A client of ``edgeexit serve`` (tritonclient over HTTP): frames or encoded images in, the same dicts as the
local runtime's ``Decision.to_dict()`` out. One client per thread (tritonclient's HTTP client is not shared)::

    from edgeexit.serve.client import ServeClient
    with ServeClient("127.0.0.1:8000", "bundle") as client:        # model "bundle_full": the plain network
        rows = client.classify_frames([rgb_uint8_frame])          # [{"class_id": 3, "label": "cat", ...}]
        rows = client.classify_images([open("cat.jpg", "rb").read()])

A request the server could not classify (an undecodable image) comes back as rows with ``failed`` set and
``class_id = exit = -1``; a request Triton rejects (wrong dtype or shape) raises tritonclient's
InferenceServerException.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from .model import FRAME_INPUT, IMAGE_INPUT, OUTPUTS, response_rows


def _http() -> Any:
    try:
        import tritonclient.http as http  # noqa: PLC0415
    except ImportError:
        raise ImportError("the serve client needs tritonclient: pip install 'tritonclient[http]' "
                          "(or 'edgeexit[serve]')") from None
    return http


class ServeClient:
    """``url``: host:port of the server's HTTP endpoint; ``model``: the bundle's model name (or ``<name>_full``)."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0):
        http = _http()
        self._http = http
        self.model = model
        self.client = http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self._outputs = [http.InferRequestedOutput(name) for name, _ in OUTPUTS]

    def infer(self, inputs: Dict[str, np.ndarray]) -> List[Dict[str, Any]]:
        """Send one request (input name -> array with the batch axis first); one dict per row."""
        tensors = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == np.object_ else self._http_dtype(array)
            tensor = self._http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self.client.infer(self.model, tensors, outputs=self._outputs)
        return response_rows({name: result.as_numpy(name) for name, _ in OUTPUTS})

    def classify_frames(self, frames: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
        """Equal-sized uint8 HxWxC frames (the bundle's channel count) in one request."""
        return self.infer({FRAME_INPUT: np.ascontiguousarray(np.stack([np.asarray(f) for f in frames]))})

    def classify_images(self, encoded: Sequence[bytes]) -> List[Dict[str, Any]]:
        """Encoded images (PNG, JPEG, BMP, WebP bytes) in one request."""
        array = np.empty((len(encoded), 1), dtype=np.object_)
        for i, data in enumerate(encoded):
            array[i, 0] = bytes(data)
        return self.infer({IMAGE_INPUT: array})

    @staticmethod
    def _http_dtype(array: np.ndarray) -> str:
        from tritonclient.utils import np_to_triton_dtype  # noqa: PLC0415

        return np_to_triton_dtype(array.dtype)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "ServeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
