"""How much of an emoji's category its name gives away: the ceiling of ``make demo-text``'s class accuracy.

    .venv/bin/python benchmarks/caption_ceiling.py [--seed 0] [--per-class 50]

``make demo-text`` scores samples of the names of held-out emoji by the category the emoji classifier sees in them.
A text VAR trained from scratch knows a word only from the training names it appears in, so it cannot place a name
better than a classifier of names trained on the same captions. This fits one: class-balanced logistic regression
on bag-of-words counts of the training captions (words as :class:`~varlib.models.text.WordTokenizer` splits them,
one column for every word not seen in training), and scores it on the prompts ``make demo-text`` scores (the same
class-balanced draw of held-out captions). Prints JSON: split sizes, the share of scored prompts that are training
captions too (skin-tone variants share their base emoji's name) and of their words unseen in training, the name
classifier's accuracy on all scored prompts and on those that are / are not training captions, and which of the
colour test's prompts are training captions.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from varlib.evaluation.emoji_classifier import dataset_labels
from varlib.models.text import WordTokenizer
from varlib.pipelines.text_demo import captioned_emoji, colour_prompts, scored_captions

words = WordTokenizer.words


def bag_of_words(captions: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """(N, len(vocabulary) + 1) word counts; the last column counts words outside the vocabulary."""
    counts_NV = torch.zeros(len(captions), len(vocabulary) + 1)
    for i, caption in enumerate(captions):
        for word in words(caption):
            counts_NV[i, vocabulary.get(word, len(vocabulary))] += 1
    return counts_NV


def fit_name_classifier(counts_NV: torch.Tensor, labels_N: torch.Tensor, num_classes: int,
                        steps: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression (Adam, full batch, a little L2): (weights (V, K), bias (K,))."""
    weight_N = (1.0 / torch.bincount(labels_N, minlength=num_classes).float())[labels_N]
    weights_VK = torch.zeros(counts_NV.shape[1], num_classes, requires_grad=True)
    bias_K = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weights_VK, bias_K], lr=0.05)
    for _ in range(steps):
        losses_N = F.cross_entropy(counts_NV @ weights_VK + bias_K, labels_N, reduction="none")
        loss = (losses_N * weight_N).sum() / weight_N.sum() + 1e-4 * weights_VK.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weights_VK.detach(), bias_K.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the scored draw's seed (make demo-text's seed)")
    parser.add_argument("--per-class", type=int, default=50, help="scored prompts per category (scored_per_class)")
    args = parser.parse_args()

    datamodule = captioned_emoji(32)
    train, val = datamodule.train_set, datamodule.val_set
    train_captions = [train.captions_N[i] for i in train.indices]
    train_labels_N = train.labels_N[train.indices]
    val_labels_N = dataset_labels(val)
    draw, scored = scored_captions(datamodule, val_labels_N, args.per_class, args.seed)
    scored_labels_N = val_labels_N[draw]

    vocabulary = {word: i for i, word in enumerate(sorted({w for c in train_captions for w in words(c)}))}
    weights_VK, bias_K = fit_name_classifier(bag_of_words(train_captions, vocabulary), train_labels_N,
                                             datamodule.num_classes)
    correct_N = (bag_of_words(scored, vocabulary) @ weights_VK + bias_K).argmax(1) == scored_labels_N
    known = set(train_captions)
    is_training_caption_N = torch.tensor([caption in known for caption in scored])
    scored_words = [w for caption in scored for w in words(caption)]
    colour = [prompt for prompt, _ in colour_prompts()]
    print(json.dumps({
        "train_images": len(train_captions), "held_out_images": len(val.indices), "scored_prompts": len(scored),
        "vocabulary_words": len(vocabulary),
        "scored_prompts_that_are_training_captions": round(float(is_training_caption_N.float().mean()), 3),
        "scored_words_unseen_in_training": round(sum(w not in vocabulary for w in scored_words) / len(scored_words), 3),
        "name_classifier_accuracy": {
            "all_scored": round(float(correct_N.float().mean()), 3),
            "not_training_captions": round(float(correct_N[~is_training_caption_N].float().mean()), 3),
            "training_captions": round(float(correct_N[is_training_caption_N].float().mean()), 3),
        },
        "colour_prompts_that_are_training_captions": sorted(p for p in colour if p in known),
        "colour_prompts_held_out": sorted(p for p in colour if p not in known),
    }, indent=2))


if __name__ == "__main__":
    main()
