from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_round_trips(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("The answer is: 42", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The answer is: 42"
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
