"""Images for both vision towers: decoding any supported input to RGB, then one resize and two normalisations.

ML-Mamba's towers see the same picture: the released "resize-naive" transform resizes it to a square (bicubic, no
crop), and only the normalisation differs (ImageNet mean/std for DINOv2, 0.5/0.5 for SigLIP). One image processor
therefore does the shared work once and returns `pixel_values` of shape (images, 2, 3, H, W): index 0 for DINOv2,
index 1 for SigLIP. It comes in transformers' two backends, with the same pixels: `MLMambaImageProcessor` (PIL and
numpy) and `MLMambaImageProcessorTorchvision` (torch), which `AutoImageProcessor` picks when torchvision is installed.

How inputs become RGB (`to_rgb_image`):
- paths (`str` or `pathlib.Path`), http(s) URLs, `data:` URLs and base64 strings are opened; a missing file, a
  folder, or a URL that cannot be fetched (or any URL while `HF_HUB_OFFLINE=1`) is one error naming it;
- transparency is composited onto white (a transparent pixel is background, whatever colour it stores);
- 16-bit data (`I;16*` images, uint16 arrays) is scaled by 255/65535. A 32-bit integer image (`I`, `I;32*`) has no
  declared depth: values within 0-255 are read as 8-bit, within 0-65535 as 16-bit, anything else is an error;
- float arrays and `F` images must hold values in [0, 1].
"""

import base64
import binascii
import os
from io import BytesIO

import numpy as np
import torch
from huggingface_hub import get_session, is_offline_mode
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType

try:
    from torchvision.transforms.v2 import functional as tvF
except ImportError:  # optional: MLMambaImageProcessor computes the same pixels without it
    tvF = None

DEFAULT_IMAGE_SIZE = 384
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
URL_TIMEOUT_SECONDS = 30


def open_image(source: str | os.PathLike) -> Image.Image:
    """The image a path, http(s) URL, `data:` URL or base64 string holds, upright (EXIF orientation applied), in
    its own mode."""
    source = os.fspath(source)
    if source.startswith(("http://", "https://")):
        return _decoded(_fetch(source), source)
    if source.startswith("data:"):
        return _decoded(_base64_payload(source.partition(",")[2], "the data URL"), "the data URL")
    if os.path.isdir(source):
        raise IsADirectoryError(f"image path {source} is a folder, not an image file")
    if os.path.isfile(source):
        with open(source, "rb") as file:
            return _decoded(file.read(), source)
    try:
        data = base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise FileNotFoundError(f"image file {_shortened(source)} does not exist (nor is it a URL or base64 data)")
    return _decoded(data, "the base64 image")


def _fetch(url: str) -> bytes:
    if is_offline_mode():
        raise ConnectionError(
            f"cannot fetch the image {url}: offline mode is on (HF_HUB_OFFLINE); download it and pass the file path"
        )
    try:
        response = get_session().get(url, timeout=URL_TIMEOUT_SECONDS, follow_redirects=True)
        response.raise_for_status()
    except Exception as error:  # httpx's errors have no common base with requests' (hub < 1.0 uses those)
        raise ConnectionError(f"cannot fetch the image {url}: {error}") from error
    return response.content


def _base64_payload(payload: str, name: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{name} does not hold valid base64 image data: {error}") from error


def _decoded(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{_shortened(name)} is not an image file that PIL can read ({error})") from error
    return ImageOps.exif_transpose(image)


def _shortened(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def to_rgb_image(image) -> Image.Image:
    """Any supported image -> an 8-bit RGB PIL image, the form the released transforms started from.

    PIL images of any mode; numpy arrays and torch tensors (2-D grey, or 3-D with 1-4 channels first or last; numpy
    prefers channels last, torch channels first; 2 or 4 channels carry alpha) of dtype uint8, uint16 (16-bit) or
    float in [0, 1]; paths, `pathlib.Path`s and URLs. The module docstring gives the rules.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, torch.Tensor):
        image = _array_to_image(image.detach().cpu().float().numpy() if image.is_floating_point()
                                else image.detach().cpu().numpy(), channels_first=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, channels_first=False)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"expected an image (PIL image, numpy array, torch tensor, path or URL), got {type(image).__name__}"
        )
    return _pil_to_rgb(image)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"got an empty image ({image.width}x{image.height} pixels)")
    if image.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(image).astype(np.uint16))).convert("RGB")
    if image.mode.startswith("I"):
        return Image.fromarray(_integer_image_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def _integer_image_to_uint8(array: np.ndarray) -> np.ndarray:
    """A 32-bit integer image declares no bit depth: read it by its value range."""
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high <= 255:
        return array.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return _to_uint8(array.astype(np.uint16))
    raise ValueError(
        f"a 32-bit integer image must hold 8-bit (0-255) or 16-bit (0-65535) values, got the range [{low}, {high}]; "
        "scale it to one of these first"
    )


def _array_to_image(array: np.ndarray, channels_first: bool) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
    if (channels_first and first) or (first and not last):
        array = np.moveaxis(array, 0, -1)
    elif not last:
        raise ValueError(
            f"cannot find the channel axis (1 to 4 channels, first or last) in an image of shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"got an empty image (shape {array.shape})")
    array = np.ascontiguousarray(_to_uint8(array))
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float images must hold values in [0, 1], got the range [{array.min()}, {array.max()}]"
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise TypeError(
        f"unsupported image dtype {array.dtype}: pass uint8 (0-255), uint16 (0-65535) or floats in [0, 1]"
    )


def checked_rgb(image, index: int) -> Image.Image:
    """`to_rgb_image`, with the image's position in the error message."""
    try:
        return to_rgb_image(image)
    except (TypeError, ValueError, OSError) as error:
        raise type(error)(f"image {index}: {error}") from error


def flat_images(images) -> list:
    """One image, a list of images, a list of lists (one per prompt) or a 4-D batch array/tensor -> a flat list."""
    if getattr(images, "ndim", None) == 4:
        return list(images)
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]


class MLMambaImagesKwargs(ImagesKwargs, total=False):
    dino_image_mean: float | list[float] | tuple[float, ...]
    dino_image_std: float | list[float] | tuple[float, ...]
    siglip_image_mean: float | list[float] | tuple[float, ...]
    siglip_image_std: float | list[float] | tuple[float, ...]


class MLMambaImageProcessingMixin:
    """What both backends share: the settings (one resize, two normalisations), their checks, and how inputs become
    RGB images. The backends differ only in what they compute the pixels with."""

    valid_kwargs = MLMambaImagesKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    dino_image_mean = DINO_MEAN
    dino_image_std = DINO_STD
    siglip_image_mean = SIGLIP_MEAN
    siglip_image_std = SIGLIP_STD

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name, None) for name in self._valid_kwargs_names})

    @classmethod
    def from_tower_processors(cls, dino: dict, siglip: dict):
        """The processor equivalent to the two per-tower image processors that earlier versions of this package
        saved (`dino_image_processor` and `siglip_image_processor` in `processor_config.json`)."""
        shared = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize")
        differing = [key for key in shared if dino.get(key) != siglip.get(key)]
        if differing:
            raise ValueError(
                f"the saved DINOv2 and SigLIP image processors differ in {differing}; ML-Mamba resizes and rescales "
                "both towers' pixels the same way"
            )
        return cls(
            **{key: dino[key] for key in shared if key in dino}, do_center_crop=dino.get("do_center_crop"),
            dino_image_mean=dino["image_mean"], dino_image_std=dino["image_std"],
            siglip_image_mean=siglip["image_mean"], siglip_image_std=siglip["image_std"],
        )

    @property
    def image_size(self) -> int:
        return self.size["height"]

    def fetch_images(self, image_url_or_urls):
        """Paths and URLs are opened by `to_rgb_image` (transparency onto white, bit depths by mode)."""
        return image_url_or_urls

    @staticmethod
    def _rgb_images(images) -> list[Image.Image]:
        return [checked_rgb(image, index) for index, image in enumerate(flat_images(images))]

    def _validate_preprocess_kwargs(self, **kwargs):
        size = dict(kwargs.get("size") or {})
        size = {key: value for key, value in size.items() if value is not None}
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(
                f"ML-Mamba resizes every image to a square: size must be {{'height': S, 'width': S}}, got {size}"
            )
        refused = {
            "do_center_crop": "ML-Mamba resizes without cropping",
            "do_pad": "every image is resized to the same square, so there is nothing to pad",
            "image_mean": "two towers, two normalisations: set dino_image_mean and siglip_image_mean",
            "image_std": "two towers, two normalisations: set dino_image_std and siglip_image_std",
        }
        for name, reason in refused.items():
            if kwargs.get(name):
                raise ValueError(f"{name}={kwargs[name]!r} is not supported: {reason}")
        if kwargs.get("do_convert_rgb") is False:
            raise ValueError("do_convert_rgb=False is not supported: both towers read RGB")
        if kwargs.get("do_rescale") and kwargs.get("rescale_factor") is None:
            raise ValueError("do_rescale=True needs a rescale_factor (1/255 for 8-bit images)")
        if kwargs.get("do_normalize"):
            missing = [name for name in ("dino_image_mean", "dino_image_std", "siglip_image_mean", "siglip_image_std")
                       if kwargs.get(name) is None]
            if missing:
                raise ValueError(f"do_normalize=True needs {missing}")


class MLMambaImageProcessor(MLMambaImageProcessingMixin, PilBackend):
    r"""
    The pixels of both towers from one resize: each image is resized to `size` (a square; bicubic, no crop),
    rescaled to [0, 1], then normalised with `dino_image_mean`/`dino_image_std` and with
    `siglip_image_mean`/`siglip_image_std`. `pixel_values` is (images, 2, 3, H, W), DINOv2 first.

    The standard `image_mean`/`image_std` are refused (two towers, two normalisations), and so are cropping and
    padding, which the released model never saw. Inputs: see `to_rgb_image`. This is the PIL/numpy backend;
    `MLMambaImageProcessorTorchvision` computes the same pixels with torch.
    """

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        return [np.moveaxis(np.asarray(image), -1, 0) for image in self._rgb_images(images)]

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, dino_image_mean, dino_image_std, siglip_image_mean,
                    siglip_image_std, return_tensors=None, **kwargs) -> BatchFeature:
        towers = ((dino_image_mean, dino_image_std), (siglip_image_mean, siglip_image_std))
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            pair = [self.normalize(image, mean, std) for mean, std in towers] if do_normalize else [image, image]
            processed.append(np.stack(pair).astype(np.float32))
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


class MLMambaImageProcessorTorchvision(MLMambaImageProcessingMixin, TorchvisionBackend):
    r"""
    `MLMambaImageProcessor`'s pixels, bit for bit, computed with torchvision and torch (on `device` when given):
    the backend that `AutoImageProcessor` picks when torchvision is installed.

    The resize is torchvision's resize of the PIL image, which is PIL's own: the transform the released model was
    trained with. Resizing a tensor instead (torchvision's tensor bicubic) would move about 1% of the pixels by one
    or two levels of 255. Rescaling rounds as the PIL backend does (in float64, then to float32).
    """

    def __init__(self, **kwargs):
        if tvF is None:
            raise ImportError(
                "MLMambaImageProcessorTorchvision needs torchvision (pip install torchvision); MLMambaImageProcessor "
                "gives the same pixels with PIL alone"
            )
        super().__init__(**kwargs)

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list[Image.Image]:
        return self._rgb_images(images)

    def _preprocess(self, images: list[Image.Image], do_resize: bool, size, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, dino_image_mean, dino_image_std, siglip_image_mean,
                    siglip_image_std, return_tensors=None, device=None, **kwargs) -> BatchFeature:
        towers = ((dino_image_mean, dino_image_std), (siglip_image_mean, siglip_image_std))
        interpolation = pil_torch_interpolation_mapping.get(resample, resample)
        processed = []
        for image in images:
            if do_resize:
                image = tvF.resize(image, [size["height"], size["width"]], interpolation=interpolation)
            pixels = tvF.pil_to_tensor(image).to(device)
            pixels = (pixels.double() * rescale_factor).float() if do_rescale else pixels.float()
            if do_normalize:
                pair = [tvF.normalize(pixels, list(mean), list(std)) for mean, std in towers]
            else:
                pair = [pixels, pixels]
            processed.append(torch.stack(pair))
        if return_tensors is not None and TensorType(return_tensors) == TensorType.NUMPY:
            # transformers 5.17's BatchFeature cannot turn a list of tensors into numpy arrays.
            processed = [pixels.cpu().numpy() for pixels in processed]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


__all__ = ["MLMambaImageProcessor", "MLMambaImageProcessorTorchvision", "open_image", "to_rgb_image"]
