"""Evaluation and attacks: CHAIR, POPE, BLEU, perplexity, relearning / LoRA / prompt attacks,
the sharpness probe and the comparison report (docs/evaluation.md, docs/method.md section 5).

    coco      COCO-format ground truth (instances + reference captions), per CHAIR mode
    images    the fixed list of captioned images (default: the 500 POPE images; --images FILE)
    chair     CHAIR_S / CHAIR_I with per-caption mentioned, grounded, hallucinated objects
    chair_reference  CHAIR mode `reference`: the published script's caption_to_words
    treebank  nltk.word_tokenize as the published numbers saw it (Punkt split without data, Treebank rules)
    singular  pattern.en's singularize, re-stated from its published rules
    protocol  named evaluation settings (resources/protocol_coco-chair-pope.json)
    pope      POPE question files, the reference answer parsing, accuracy/precision/recall/F1/yes-ratio
    quality   BLEU-1/2/4 (nltk), perplexity, caption length
    distributed  spread items over ranks, gather results (plain or ZeRO-3 generation)
    weights   a method's model = base checkpoint + runs/<run>/trainable.safetensors
    runs      `--run` / `--method` values (name=dir, dir, base) -> run folders
    evaluate  caption + POPE evaluation of one model; `evaluate_run` for a training run
    attacks   relearning, LoRA fine-tuning and adversarial-prompt attacks
    probe     L_neg along the gradient direction vs random directions (sharpness)
    report    Markdown/JSON comparison table, relearning curve and landscape PNGs
    scenes    a COCO-format evaluation set of the generated scenes (toy world, quickstart)
"""
