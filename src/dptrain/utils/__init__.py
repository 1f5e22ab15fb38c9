"""Opacus-compatible utilities: ``dptrain.utils.batch_memory_manager.BatchMemoryManager``,
``dptrain.utils.uniform_sampler.UniformWithReplacementSampler``."""
