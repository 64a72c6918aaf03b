"""Inference: the K-step sampler, checkpoint loading and caching, image encoding and export (DESIGN §2).

    inference.sampler     sample(net, cond, timesteps, param, seeds=..., latent_shape=...): the one sampler
                          (it lives in trainer/sampling.py: part of the method; re-exported here)
    inference.checkpoint  CheckpointInfo (meta.json, steps, sizes, export formats), no torch at import
    inference.pipeline    load_pipeline(checkpoint) -> FewStepPipeline.generate(prompts, seeds, ...)
    inference.cache       PipelineCache: a thread-safe LRU of loaded pipelines within a memory budget
    inference.images      encode_image(uint8 array, "png" | "jpeg" | "webp") -> bytes
    inference.export      export_checkpoint(checkpoint, "diffusers" | "unet" | "lora" | "lora-kohya", out)
    inference.lora        reading checkpoint LoRA (with its alpha) and kohya/ComfyUI key names
    inference.cli         `flashdmd generate` and `flashdmd export`

Nothing is imported here, so `import inference.checkpoint` stays cheap for the API.
"""
