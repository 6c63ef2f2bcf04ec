def test_the_meta_skeleton_has_the_loaded_models_parameters(tmp_path):
    """Under fsdp the other processes build the base on the meta device; FSDP2 maps the optimizer's parameters
    by name, so the skeleton must tie embeddings as from_pretrained does (SmolLM2 ties them)."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    from abba_cli.models import load_base

    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), tie_word_embeddings=True).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_base(str(tmp_path))
    skeleton, _ = load_base(str(tmp_path), empty_weights=True)
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
