"""Parity fixture of ``mkd`` against zqb77/MICCAI25 (online three-model distillation).

    python benchmarks/parity/mkd.py --ref-dir /path/to/MICCAI25

Runs the authors' training loop itself, ``trainer/online_kd_trainer.train_loop_classification_coattn``,
on one window of W = 4 bags (``args.gc`` = 4; bench's ``accumulation_steps`` = 4), with the settings of
``train_kd.py``'s README command (``--intermediate_loss_fn SP --logits_loss_fn KL --OR OR``, T = 4):
per slide ``(CE_s + CE_m + CE_o) / W`` backpropagated at once, then the window's SP, KL, orthogonality and
CORAL terms. The optimiser is a stand-in that records the gradients when the loop steps (the window's
whole gradient, student and both teachers). Loss terms: the cross-entropies from the loop's own
``loss_fn`` calls; SP, KL and CORAL from the reference's ``Similarity``, ``DistillKL`` and ``MMD_Loss`` on
the window's stacked outputs, combined as the loop combines them; the orthogonality term is the loop's
``loss_kd`` (read as it is backpropagated) minus those three.

Dropout 0 everywhere (the reference's dropout layers; bench's ``dropout``), train mode as the loop.
Widths: feature width 16 and gated-attention width 8 instead of 256 and 128 (fusion units 16 / 8 = 2,
the fusion's hidden width 256 as the code), patch features D = 64 instead of the code's 1024, omics
G = 1024 (two tokens of 512, the code's token size): the three models' layers are rebuilt at these widths
from the reference's own ``Attention_Gated``, ``ABMIL`` and ``BilinearFusion``; their forward code runs
unchanged. The omics teacher's unused ``classifier`` keeps its own values. On a machine without CUDA,
``torch.cuda.FloatTensor(B, 1)`` (where ``BilinearFusion`` allocates the constant 1s it appends) is served
as a CPU tensor for the duration of the loop.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import (
    Recorder,
    RecordingOptimizer,
    bench_model,
    capture_output,
    copy_into_reference,
    import_reference,
    no_dropout,
    parse_args,
    reference_commit,
    reference_grads,
    seeded_bag,
)
from torch import nn

REPO = "zqb77/MICCAI25"
DIM, GENES, HIDDEN, ATTN, WINDOW, TEMP = 64, 1024, 16, 8, 4, 4.0
BAGS = ((37, 0), (200, 1), (64, 1), (120, 0))
OVERRIDES = {"hidden_dim": HIDDEN, "attn_dim": ATTN, "dropout": 0.0, "accumulation_steps": WINDOW}
GATED = {"a.0": "attention_V.0", "b.0": "attention_U.0", "c": "attention_weights"}
FUSION = {
    "h1.0": "linear_h1.0",
    "z1": "linear_z1",
    "o1.0": "linear_o1.0",
    "h2.0": "linear_h2.0",
    "z2": "linear_z2",
    "o2.0": "linear_o2.0",
    "encoder1.0": "encoder1.0",
    "encoder2.0": "encoder2.0",
}
MODULES = {  # bench module prefix -> reference module prefix
    "student.fc.0": "student._fc1.0",
    "student.head.1": "student.classifier.fc",
    **{f"student.attention.{k}": f"student.attention.{v}" for k, v in GATED.items()},
    "omics_teacher.tokens.0": "omics_teacher.fc1.0",
    "omics_teacher.head.1": "omics_teacher.abmil.classifier.fc",
    **{f"omics_teacher.attention.{k}": f"omics_teacher.abmil.attention.{v}" for k, v in GATED.items()},
    "multimodal_teacher.path_fc.0": "multimodal_teacher.wsi_net.0",
    "multimodal_teacher.tokens.0": "multimodal_teacher.snn.0",
    **{
        f"multimodal_teacher.path_attention.{k}": f"multimodal_teacher.attention_path.{v}"
        for k, v in GATED.items()
    },
    **{
        f"multimodal_teacher.omics_attention.{k}": f"multimodal_teacher.attention_snn.{v}"
        for k, v in GATED.items()
    },
    **{f"multimodal_teacher.fusion.{k}": f"multimodal_teacher.mm.{v}" for k, v in FUSION.items()},
    "multimodal_teacher.classifier": "multimodal_teacher.classifier",
}


class NoScheduler:
    def step(self) -> None:
        pass


def build_reference(online_kd, snnmil) -> nn.Module:
    """The three reference models at the fixture's widths, under one container (names ``student.``,
    ``omics_teacher.``, ``multimodal_teacher.``)."""
    student = online_kd.ABMIL(L=HIDDEN, D=ATTN, K=1, n_classes=2, dropout=0.0)
    student._fc1 = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU())
    omics = snnmil.SNNMIL(n_classes=2, dropout=0.0)
    omics.fc1 = nn.Sequential(nn.Linear(512, HIDDEN), nn.ELU(), nn.AlphaDropout(p=0.0))
    omics.abmil = snnmil.ABMIL(L=HIDDEN, D=ATTN, K=1, num_cls=2, droprate=0.0)
    multi = online_kd.ABMIL_SNN(fusion="bilinear", n_classes=2, dropout=0.0)
    multi.wsi_net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Dropout(0.0))
    multi.snn = nn.Sequential(nn.Linear(512, HIDDEN), nn.ELU(), nn.AlphaDropout(p=0.0))
    multi.attention_path = online_kd.Attention_Gated(L=HIDDEN, D=ATTN, K=1)
    multi.attention_snn = online_kd.Attention_Gated(L=HIDDEN, D=ATTN, K=1)
    multi.mm = online_kd.BilinearFusion(dim1=HIDDEN, dim2=HIDDEN, scale_dim1=8, scale_dim2=8, mmhid=HIDDEN)
    multi.classifier = nn.Linear(HIDDEN, 2)
    ref = nn.Module()
    ref.student, ref.omics_teacher, ref.multimodal_teacher = student, omics, multi
    no_dropout(ref)
    return ref


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    online_kd, snnmil, trainer, sp_mod, kd_mod, mmd_mod = import_reference(
        args.ref_dir,
        "models.online_kd",
        "models.snnmil",
        "trainer.online_kd_trainer",
        "utils/loss/SP.py",
        "utils/loss/KD.py",
        "utils.MMD_loss",
    )
    import torchmetrics

    bench = bench_model("mkd", DIM, GENES, OVERRIDES, seed=0)
    ref = build_reference(online_kd, snnmil)
    names = {}
    for name in bench.state_dict():
        module, leaf = name.rsplit(".", 1)
        names[name] = f"{MODULES[module]}.{leaf}"
    keep = [k for k in ref.state_dict() if k.startswith("omics_teacher.classifier.")]
    copy_into_reference(bench, ref, names, keep=keep)
    ref.train()

    bags = [seeded_bag(500 + j, n, DIM, y, omics_dim=GENES) for j, (n, y) in enumerate(BAGS)]
    loader = [
        (
            torch.from_numpy(b["features"]),
            torch.from_numpy(b["omics"]).view(1, -1),
            torch.tensor([int(b["label"])]),
            j,
        )
        for j, b in enumerate(bags)
    ]
    ce_calls: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        value = nn.CrossEntropyLoss()(logits, label)
        ce_calls.append(value.detach())
        return value

    backward_values: list[torch.Tensor] = []
    original_backward = torch.Tensor.backward

    def recording_backward(self: torch.Tensor, *a, **k):
        backward_values.append(self.detach().clone())
        return original_backward(self, *a, **k)

    metrics = torchmetrics.MetricCollection(
        [
            torchmetrics.classification.BinaryAccuracy(),
            torchmetrics.classification.BinaryPrecision(),
            torchmetrics.classification.BinaryRecall(),
            torchmetrics.classification.BinarySpecificity(),
            torchmetrics.classification.BinaryF1Score(),
        ]
    )
    opt = RecordingOptimizer(ref)
    inter_fn, logits_fn = sp_mod.Similarity(), kd_mod.DistillKL(T=TEMP)
    with (
        tempfile.TemporaryDirectory() as tmp,
        capture_output(ref.student.attention) as attention,
        capture_output(ref.student) as student_out,
        capture_output(ref.omics_teacher) as omics_out,
        capture_output(ref.multimodal_teacher) as multi_out,
    ):
        torch.Tensor.backward = recording_backward
        cuda_float = torch.cuda.FloatTensor
        if not torch.cuda.is_available():  # the fusion allocates its constant 1s as a CUDA tensor
            torch.cuda.FloatTensor = lambda *shape: torch.empty(*shape)
        try:
            trainer.train_loop_classification_coattn(
                0,
                ref.student,
                ref.multimodal_teacher,
                ref.omics_teacher,
                loader,
                opt,
                NoScheduler(),
                inter_fn,
                logits_fn,
                torchmetrics.AUROC(task="binary"),
                torchmetrics.AveragePrecision(task="binary"),
                metrics,
                loss_fn=loss_fn,
                args=argparse.Namespace(
                    gc=WINDOW, intermediate_loss_fn="SP", logits_loss_fn="KL", OR="OR", writer_dir=tmp
                ),
            )
        finally:
            torch.Tensor.backward = original_backward
            torch.cuda.FloatTensor = cuda_float
    assert len(ce_calls) == 3 * WINDOW and len(backward_values) == WINDOW + 1
    with torch.no_grad():
        z_s, f_s = torch.cat([o[0] for o in student_out]), torch.cat([o[3] for o in student_out])
        z_o, f_o = torch.cat([o[0] for o in omics_out]), torch.cat([o[3] for o in omics_out])
        z_m, f_m = torch.cat([o[0] for o in multi_out]), torch.cat([o[3] for o in multi_out])
        align = mmd_mod.MMD_Loss(kernel_type="mean_cov")
        sp = (inter_fn(f_s, f_m) + inter_fn(f_s, f_o)).reshape(()) * WINDOW
        kl = logits_fn(z_s, z_m) + logits_fn(z_m, z_s) + logits_fn(z_s, z_o) + logits_fn(z_o, z_s)
        coral = align(f_m, f_s) + align(f_o, f_s) + align(f_o, f_m)
        losses = {
            "ce": torch.stack(ce_calls).sum() / WINDOW,
            "sp": sp,
            "kl": kl,
            "coral": coral,
            "orthogonal": backward_values[-1] - sp - kl - coral,
        }
    opt.restore()
    rec = Recorder(
        "mkd",
        {
            "method": "mkd",
            "overrides": OVERRIDES,
            "in_dim": DIM,
            "omics_dim": GENES,
            "mode": "train",
            "reference": {
                "repo": REPO,
                "commit": commit,
                "files": [
                    "trainer/online_kd_trainer.py",
                    "models/online_kd.py",
                    "models/snnmil.py",
                    "models/model_utils/model_utils.py",
                    "utils/loss/SP.py",
                    "utils/loss/KD.py",
                    "utils/MMD_loss.py",
                ],
            },
            "script": "benchmarks/parity/mkd.py",
            "notes": "train_loop_classification_coattn on one window of 4 bags (gc=4, SP, KL, OR), train mode, "
            "dropout 0; gradients at its optimizer.step(); orthogonal = loss_kd - sp - kl - coral; widths 16/8, D=64.",
        },
        bench,
    )
    outputs = [
        {"logits": s[0][0], "embedding": s[3][0], "attention": a[0]}
        for s, a in zip(student_out, attention, strict=True)
    ]
    rec.case("window4", bags, outputs, losses, reference_grads(ref, names))
    rec.save(args.out)


if __name__ == "__main__":
    main()
