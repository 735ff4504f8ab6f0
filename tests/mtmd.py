"""llama.cpp's multimodal library (libmtmd, through llama-cpp-python's bindings): the image embeddings
llama.cpp computes from a text GGUF and an mmproj, as the reference for `l4q export gguf --mmproj`."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def image_embeddings(text_gguf: Path, mmproj: Path, image: np.ndarray) -> np.ndarray:
    """[tokens, n_embd] float32: what mtmd feeds the text model for `image` (uint8 [height, width, 3]),
    in mtmd's token order."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {text_gguf}"
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
    assert ctx, f"mtmd could not load {mmproj}"
    height, width, _ = image.shape
    pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image, np.uint8).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, pixels)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = mtmd.mtmd_default_marker()
        prompt = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        n_embd = llama_cpp.llama_model_n_embd(model)
        images = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            out = mtmd.mtmd_get_output_embd(ctx)
            images.append(np.ctypeslib.as_array(out, shape=(n * n_embd,)).reshape(n, n_embd).copy())
        (embeddings,) = images
        return embeddings
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)
