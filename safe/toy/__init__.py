"""The toy world: a deterministic, seeded data root of synthetic clips, images, captions and VQA questions that the
embedded default (`make demo`) and the tests train on."""
