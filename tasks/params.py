"""Typed stage parameters: one YAML file per stage under params/, validated before any work.

Each stage's file validates into the model registered for it in STAGE_PARAMS. The defaults
of those models are the `default` profile (runtime/profiles.py writes the files from profiles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import StageError

PARAMS_DIR = Path("params")


class ParamsError(StageError, ValueError):
    """A params file that does not validate; the message names the file, key, value and what is allowed."""


class Strict(BaseModel):
    """Unknown keys are refused, values are never coerced silently, floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainParams(Strict):
    """The training loop's knobs, shared by every training stage."""

    epochs: float = Field(10.0, gt=0, description="passes over the training split")
    batch_size: int = Field(128, ge=2, le=65536, description="global batch, split over ranks")
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/LARS momentum")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null turns clipping off")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights; null for none")
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable saves")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16: autocast on any device")
    compile: bool = Field(False, description="torch.compile the trained networks (augmentation and losses stay eager)")
    channels_last: bool = Field(True, description="convolution weights and activations in NHWC layout")
    processes: int = Field(
        1, ge=1, le=1024, description="processes for this stage under torchrun (DDP): GPUs on a GPU machine, gloo processes on CPU"
    )


Source = Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"]


class PrepareParams(Strict):
    """Raw dataset -> uint8 train/val/test splits."""

    source: Source = "mnist"
    root: str | None = Field(None, description="raw files; default data/raw/<source>")
    download: bool = Field(True, description="fetch missing files from the canonical mirrors")
    image_size: int = Field(16, ge=4, le=512)
    fit: Literal["resize", "pad"] = Field("resize", description="how images reach image_size")
    channels: Literal[1, 3] | None = Field(None, description="null keeps the source's")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    official_test: bool = Field(True, description="use the source's own test split when it has one")
    limit_per_class: int | None = Field(None, ge=3, description="keep at most this many per class")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> PrepareParams:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must stay below 0.8")
        return self


class ResNetParams(Strict):
    width: int = Field(48, ge=4, le=512, description="channels of the first stage, doubled per stage")
    depth: list[int] = Field([1, 1, 1], min_length=1, max_length=6, description="BasicBlocks per stage; [2,2,2,2] is ResNet-18")
    stem_stride: Literal[1, 2] = Field(1, description="1 keeps the image size (CIFAR-style); 2 halves it in the stem, about 3.5x cheaper on 28 px and up")


class ViTParams(Strict):
    patch_size: int = Field(4, ge=1, le=32)
    dim: int = Field(128, ge=8, le=2048)
    depth: int = Field(4, ge=1, le=32)
    heads: int = Field(4, ge=1, le=32)
    mlp_ratio: int = Field(4, ge=1, le=8)
    pool: Literal["cls", "mean"] = Field("cls", description="the feature: the cls token, or the mean patch token (use it with ijepa: its paper probes mean-pooled tokens, and its loss trains the cls token only as context for the predictor)")

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> ViTParams:
        if self.dim % self.heads:
            raise ValueError("vit.heads must divide vit.dim")
        return self


class SimCLRParams(Strict):
    proj_hidden_dim: int = Field(256, ge=8)
    proj_dim: int = Field(128, ge=8)
    temperature: float = Field(0.2, gt=0, le=10)


class TripletParams(Strict):
    """Schroff et al. 2015 (FaceNet: the triplet loss with a margin on l2-normalised embeddings) with Hermans et al. 2017's batch-hard negatives; the two views of an image are the only pair that matches."""

    proj_hidden_dim: int = Field(256, ge=8, description="the projector's hidden layer, as SimCLR's (Hermans et al.: 1024, then batch norm and ReLU, as here)")
    proj_dim: int = Field(128, ge=8, description="the embedding the loss sees, l2-normalised (FaceNet and Hermans et al.: 128)")
    margin: float = Field(0.2, gt=0, le=2, description="alpha, the gap each negative must keep beyond the positive (FaceNet: 0.2), in Euclidean distance on the unit sphere, where distances lie in [0, 2]")
    soft_margin: bool = Field(False, description="softplus(d(a, p) - d(a, n)) in place of the hinge, Hermans et al.'s soft margin: never zero, so easy triplets keep pulling; margin is then unused")


class MoCoParams(Strict):
    proj_hidden_dim: int = Field(256, ge=8)
    proj_dim: int = Field(128, ge=8)
    temperature: float = Field(0.2, gt=0, le=10)
    queue_size: int = Field(1024, ge=16, description="negatives kept; well under the training set size")
    momentum_base: float = Field(0.99, gt=0, lt=1, description="momentum at step 0, cosine to 1")


class BYOLParams(Strict):
    proj_hidden_dim: int = Field(256, ge=8)
    proj_dim: int = Field(64, ge=8)
    pred_hidden_dim: int = Field(256, ge=8)
    momentum_base: float = Field(0.99, gt=0, lt=1)


class DINOParams(Strict):
    out_dim: int = Field(256, ge=8, description="prototypes")
    hidden_dim: int = Field(256, ge=8)
    bottleneck_dim: int = Field(64, ge=8)
    head_batch_norm: bool = Field(True, description="batch norm in the head (off for ViT, as in the paper)")
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.07, gt=0, description="after the warm-up")
    warmup_teacher_temperature: float = Field(0.04, gt=0)
    teacher_warmup_fraction: float = Field(0.3, ge=0, lt=1, description="share of steps warming the teacher temperature up")
    center_momentum: float = Field(0.9, gt=0, lt=1)
    momentum_base: float = Field(0.99, gt=0, lt=1)


class RotationParams(Strict):
    pass


class MAEParams(Strict):
    """He et al. 2022; the paper's decoder is 512 wide and 8 deep for ViT-L, ours is scaled to the small ViT."""

    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches hidden: high, so the task cannot be solved by interpolating neighbours")
    decoder_dim: int = Field(64, ge=8, description="the decoder is narrow: it is thrown away, the encoder does the work")
    decoder_depth: int = Field(2, ge=1, le=16, description="a deeper decoder leaves the encoder's last layers more abstract (better linear probes)")
    decoder_heads: int = Field(4, ge=1, le=32)
    norm_pix_loss: bool = Field(True, description="targets are each patch's pixels normalised by its own mean and std (sharper features, as in the paper)")

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> MAEParams:
        if self.decoder_dim % self.decoder_heads:
            raise ValueError("mae.decoder_heads must divide mae.decoder_dim")
        return self


class IJEPAParams(Strict):
    """Assran et al. 2023; the paper's predictor is 384 wide and 12 deep, ours is scaled to the small ViT."""

    predictor_dim: int = Field(64, ge=8, description="a narrow predictor, so the encoder's tokens carry the semantics")
    predictor_depth: int = Field(2, ge=1, le=16)
    predictor_heads: int = Field(4, ge=1, le=32)
    num_targets: int = Field(4, ge=1, le=16, description="target blocks per image (paper: 4)")
    target_scale: list[float] = Field([0.15, 0.2], min_length=2, max_length=2, description="each block's share of the patches: large enough to be semantic, not texture")
    target_aspect: list[float] = Field([0.75, 1.5], min_length=2, max_length=2, description="blocks' height/width range")
    momentum_base: float = Field(0.996, gt=0, lt=1, description="target-encoder EMA at step 0, cosine to 1")

    @model_validator(mode="after")
    def _ranges_and_heads(self) -> IJEPAParams:
        low, high = self.target_scale
        if not 0 < low <= high < 1:
            raise ValueError("ijepa.target_scale must be [low, high] with 0 < low <= high < 1")
        if not 0 < self.target_aspect[0] <= self.target_aspect[1]:
            raise ValueError("ijepa.target_aspect must be [low, high] with 0 < low <= high")
        if self.predictor_dim % self.predictor_heads:
            raise ValueError("ijepa.predictor_heads must divide ijepa.predictor_dim")
        return self


class JigsawParams(Strict):
    """Noroozi & Favaro 2016: a 3x3 puzzle; the paper's 1000 permutations suit ImageNet, 100 suit a few thousand small images."""

    grid: int = Field(3, ge=2, le=3, description="tiles per side: 3x3 is the paper's, hard enough to need object parts (the set is searched among all 9! orders)")
    num_permutations: int = Field(100, ge=2, le=2000, description="classes: permutations chosen far apart in Hamming distance, so each differs from the others in many tiles")
    tile_fraction: float = Field(0.85, gt=0, le=1, description="tile side / cell side (paper: 64 of 75 px): the gap hides edge continuity, a shortcut")
    hidden_dim: int = Field(512, ge=8, description="the classifier's hidden layer over the concatenated tile features (paper: 4096)")


class CPCParams(Strict):
    """Hénaff et al. 2020 (CPC v2): the paper's 7x7 grid of 64-pixel patches is scaled to 3x3 for 16- to 28-pixel images."""

    grid: int = Field(3, ge=2, le=8, description="patches per side, overlapping by half, each embedded on its own (the batch-norm statistics of a ResNet backbone still mix them, which CPC v2 avoided with layer norm)")
    context_dim: int = Field(128, ge=8, description="width of the context network")
    context_layers: int = Field(2, ge=1, le=12, description="row-causal residual blocks: more rows above in each context")
    prediction_steps: int = Field(2, ge=1, le=7, description="how many rows below each context predicts (a linear map each): farther rows need more than texture")

    @model_validator(mode="after")
    def _steps_fit_the_grid(self) -> CPCParams:
        if self.prediction_steps >= self.grid:
            raise ValueError(f"cpc.prediction_steps ({self.prediction_steps}) must be below cpc.grid ({self.grid}): no row lies that far below")
        return self


class InpaintingParams(Strict):
    """Pathak et al. 2016 (context encoders), random-block variant, L2 loss on the hidden block (the paper's small adversarial term is left out)."""

    block_fraction: float = Field(0.5, gt=0, lt=1, description="the hidden square's side / the image side (paper: 64 of 128 px): big enough that texture alone cannot fill it")
    decoder_dim: int = Field(64, ge=8, description="width of the light decoder back to pixels")


class DaeParams(Strict):
    """Vincent et al. 2008 (masking noise) and 2010 (stacked DAEs: Gaussian noise too), a conv decoder from the feature map, L2 against the clean image on every pixel."""

    corruption: Literal["gaussian", "masking"] = Field("gaussian", description="additive isotropic Gaussian, which Vincent et al. 2010 name a natural choice for real-valued inputs (pixels are, on every source), or masking: a fixed fraction of each image's pixels set to 0, the [-1, 1] data's middle grey (Vincent et al. 2008)")
    sigma: float = Field(0.5, gt=0, le=2, description="the Gaussian noise's std on the [-1, 1] pixel scale: a quarter of the range, so a pixel alone no longer tells its value and the decoder needs its context, while strokes stay legible")
    mask_fraction: float = Field(0.25, gt=0, lt=1, description="masking noise: the share of each image's pixels set to 0, a common choice: most of the image stays to infer the rest from")
    decoder_dim: int = Field(64, ge=8, description="width of the light decoder back to pixels")


class ColorizationParams(Strict):
    """Zhang et al. 2016: per-pixel classification of quantised ab colour from lightness, with class rebalancing (colour sources only)."""

    bin_size: float = Field(10.0, ge=2, le=55, description="side of an ab bin (paper: 10): colours are classified, not regressed, so a pixel can be red or blue without averaging to grey")
    rebalance: float = Field(0.5, ge=0, le=1, description="lambda mixing the bin frequency with uniform before inverting it to weights (paper: 0.5): rare saturated colours count")
    frequency_momentum: float = Field(0.99, ge=0, lt=1, description="running average of the bin frequencies over training batches")
    decoder_dim: int = Field(64, ge=8, description="width of the light decoder to per-pixel bin logits")


class AugmentParams(Strict):
    crop_scale: list[float] = Field([0.3, 1.0], min_length=2, max_length=2, description="RandomResizedCrop area range")
    flip: bool = Field(False, description="horizontal flips (off for digits: a flipped 2 is not a 2)")
    jitter_strength: float = Field(0.5, ge=0, le=1, description="colour jitter, RGB only")
    jitter_prob: float = Field(0.8, ge=0, le=1)
    grayscale_prob: float = Field(0.2, ge=0, le=1, description="RGB only")
    blur_prob: float = Field(0.0, ge=0, le=1, description="gaussian blur (SimCLR leaves it out for small images)")


PATCH_TOKEN_OBJECTIVES = ("mae", "ijepa")  # objectives that only the ViT backbone can train


class SslParams(Strict):
    """Self-supervised pretraining of a backbone."""

    backbone: Literal["resnet", "vit"] = "resnet"
    resnet: ResNetParams = ResNetParams()
    vit: ViTParams = ViTParams()
    objective: Literal["simclr", "moco", "byol", "dino", "rotation", "mae", "ijepa", "jigsaw", "cpc", "inpainting", "dae", "colorization", "triplet"] = "simclr"
    simclr: SimCLRParams = SimCLRParams()
    moco: MoCoParams = MoCoParams()
    byol: BYOLParams = BYOLParams()
    dino: DINOParams = DINOParams()
    rotation: RotationParams = RotationParams()
    mae: MAEParams = MAEParams()
    ijepa: IJEPAParams = IJEPAParams()
    jigsaw: JigsawParams = JigsawParams()
    cpc: CPCParams = CPCParams()
    inpainting: InpaintingParams = InpaintingParams()
    dae: DaeParams = DaeParams()
    colorization: ColorizationParams = ColorizationParams()
    triplet: TripletParams = TripletParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams(epochs=2, batch_size=256, lr=4e-3, weight_decay=1e-4, log_every=20)
    knn_every_epochs: int = Field(0, ge=0, description="online kNN on val every N epochs; 0 = only at the end")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _objective_fits_the_backbone(self) -> SslParams:
        if self.objective in PATCH_TOKEN_OBJECTIVES and self.backbone != "vit":
            raise ValueError(
                f"objective: {self.objective} needs backbone: vit, not {self.backbone} "
                "(it hides and predicts the ViT's patch tokens, which a ResNet does not have)"
            )
        return self


class EncoderParams(Strict):
    """Freeze and export the SSL backbone, embed every split."""

    batch_size: int = Field(1024, ge=1)
    plot_method: Literal["tsne", "pca"] = Field("tsne", description="2-D embedding plot; tsne uses at most plot_points")
    plot_points: int = Field(1500, ge=10)
    collapse_tolerance: float = Field(1e-4, gt=0, description="fail when every dim's relative std is below it")
    seed: int = Field(0, ge=0)


class ProbeParams(Strict):
    """Linear probe and kNN on frozen features, with baselines."""

    weight_decays: list[float] = Field([1e-5, 1e-4, 1e-3], min_length=1, description="grid searched on val")
    label_fractions: list[float] = Field([0.01, 0.1, 1.0], min_length=1, description="shares of the training labels")
    knn_k: int = Field(20, ge=1)
    baselines: bool = Field(True, description="also probe raw pixels and a randomly initialised encoder")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_in_range(self) -> ProbeParams:
        if any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError("label_fractions must lie in (0, 1]")
        return self


class KdParams(Strict):
    """Knowledge distillation (Hinton et al. 2015) of a classifier into a small CNN, trained twice
    with the same seed and budget: with the soft term, and on the labels alone."""

    teacher: Literal["cnn", "probe"] = Field("cnn", description="cnn: a wider CNN trained on the labels first, as in Hinton et al.'s MNIST experiment (a large net distilled into a small one); probe: the pipeline's frozen encoder and linear probe, which 2 epochs of SSL leave weaker than what the student learns from the labels alone")
    teacher_widths: list[int] = Field([32, 64], min_length=1, max_length=4, description="the cnn teacher's conv stages, as student_widths")
    teacher_train: TrainParams = TrainParams(epochs=4, batch_size=128, lr=3e-3, log_every=20)
    temperature: float = Field(4.0, gt=0, le=100, description="T softening teacher and student outputs (Hinton et al. 2015 found T 2.5-4 best for small MNIST students; 4 is common practice)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft term (times T^2); 1 - alpha weighs the labels' cross-entropy, which Hinton et al. found best kept considerably lower; 0.9 is common practice")
    student_widths: list[int] = Field([16, 32], min_length=1, max_length=4, description="channels of the student's conv stages, each a 3x3 conv, ReLU and 2x2 max-pool")
    train: TrainParams = TrainParams(epochs=3, batch_size=128, lr=3e-3, log_every=20)
    batch_size: int = Field(1024, ge=1, description="images a forward pass when measuring top-1 and images/s")
    seed: int = Field(0, ge=0, description="the same for both students: the same initial weights and batches")

    @model_validator(mode="after")
    def _widths_positive(self) -> KdParams:
        if any(width < 1 for width in [*self.student_widths, *self.teacher_widths]):
            raise ValueError("student_widths and teacher_widths must be positive")
        return self


class AdversarialParams(Strict):
    enabled: bool = Field(False, description="train a PatchGAN discriminator (hinge loss) against the decoder")
    weight: float = Field(0.1, ge=0, description="weight of the generator's hinge term")
    warmup_fraction: float = Field(0.5, ge=0, lt=1, description="share of steps before the discriminator joins")
    width: int = Field(32, ge=4, le=512)
    layers: int = Field(2, ge=1, le=5, description="stride-2 stages: 2 suits 16x16 images, 3 suits 32x32")


class MMDParams(Strict):
    """InfoVAE (Zhao et al. 2019): MMD between the aggregate posterior and N(0, I), inverse multiquadric kernel."""

    weight: float = Field(1000.0, ge=0, description="lambda: the MMD^2 weight per image element (paper: 1000, large so the aggregate posterior matches the prior)")
    kl_weight: float = Field(0.0, ge=0, description="per-sample KL weight per image element; 0 is the paper's MMD-VAE (alpha = 1): no pull of each posterior to the prior")


class VQParams(Strict):
    """VQ-VAE (van den Oord et al. 2017) with an EMA codebook."""

    codebook_size: int = Field(512, ge=2, le=65536, description="codes, each latent_channels wide (paper: 512)")
    commitment: float = Field(0.25, ge=0, description="beta of the commitment loss (paper: 0.25)")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook (paper's appendix: 0.99)")
    restart_after_steps: int = Field(100, ge=1, description="a code no latent picked for this many steps restarts at a random encoder output of the batch")


class VaeParams(Strict):
    """Convolutional VAE: images -> a latent grid, and the training set's latents for diffusion."""

    downsample: Literal[1, 2, 4, 8] = Field(4, description="image size / latent grid size")
    latent_channels: int = Field(4, ge=1, le=64)
    width: int = Field(16, ge=4, le=512, description="channels at full resolution, doubling per stage up to 4x")
    regulariser: Literal["kl", "mmd", "vq"] = Field("kl", description="the bottleneck: kl (beta-VAE), mmd (InfoVAE), vq (VQ-VAE; diffusion models its pre-quantisation latents)")
    beta: float = Field(1e-4, ge=0, description="KL weight per image element (regulariser kl)")
    conditional: bool = Field(False, description="a conditional VAE (Sohn et al. 2015): its encoder and decoder also see the class; off by default, since the diffusion stage conditions on the class itself")
    mmd: MMDParams = MMDParams()
    vq: VQParams = VQParams()
    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = Field(0.1, ge=0, description="feature distance under the frozen SSL encoder; 0 turns it off")
    adversarial: AdversarialParams = AdversarialParams()
    train: TrainParams = TrainParams(epochs=1, batch_size=64, lr=2e-3, log_every=20)
    grid_images: int = Field(40, ge=1, le=400, description="images in the reconstruction and prior-sample grids")
    mismatch_samples: int = Field(2000, ge=10, description="test latents compared with as many N(0, I) draws (prior_mmd and moments)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _vq_runs_in_one_process_and_unconditional(self) -> VaeParams:
        if self.regulariser == "vq" and self.train.processes > 1:
            raise ValueError("regulariser: vq needs train.processes: 1 (each process would move its own codebook)")
        if self.conditional and self.regulariser == "vq":
            raise ValueError("conditional: true needs regulariser kl or mmd (a VQ-VAE's codes get their class from the ar stage's prior)")
        return self


class UNetParams(Strict):
    channels: int = Field(32, ge=8, le=1024, description="width of the first level")
    channel_mults: list[int] = Field([1, 2], min_length=1, max_length=5, description="each level's width / channels; each next level halves the grid")
    blocks_per_level: int = Field(1, ge=1, le=8)
    attention_heads: int = Field(4, ge=1, le=32, description="heads of the self-attention at the lowest resolution and of every cross-attention")
    dropout: float = Field(0.0, ge=0, lt=1)
    cross_attention_levels: list[int] = Field([0, 1], max_length=5, description="condition: text: the levels (0 = the first, full-resolution one) whose ResBlocks attend to the caption's tokens; the middle blocks always do")

    @model_validator(mode="after")
    def _heads_divide_the_deepest_width(self) -> UNetParams:
        if any(mult < 1 for mult in self.channel_mults):
            raise ValueError("channel_mults must be positive")
        if (self.channels * self.channel_mults[-1]) % self.attention_heads:
            raise ValueError("attention_heads must divide channels * channel_mults[-1]")
        return self


class DiTParams(Strict):
    """A DiT-S/2-shaped model (Peebles & Xie 2023's DiT-S/2: patch 2, 12 blocks of width 384 with 6
    heads, MLP ratio 4) scaled down for a CPU: 4 blocks of width 128 with 4 heads."""

    patch_size: int = Field(2, ge=1, le=16, description="side of a token's square patch of the latent grid (DiT-S/2's 2); it must divide the grid (4x4 on the default and smoke profiles)")
    dim: int = Field(128, ge=8, le=2048, description="token width (DiT-S's 384, scaled down for a CPU)")
    depth: int = Field(4, ge=1, le=48, description="transformer blocks (DiT-S's 12, scaled down for a CPU)")
    heads: int = Field(4, ge=1, le=32, description="attention heads (DiT-S's 6, scaled down for a CPU)")
    mlp_ratio: int = Field(4, ge=1, le=8, description="MLP hidden width / dim (the paper's 4)")

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> DiTParams:
        if self.dim % self.heads or self.dim % 4:
            raise ValueError("dit.dim must be a multiple of 4 (the 2-D sin-cos positions) and of dit.heads")
        return self


class RepaParams(Strict):
    """REPA (Yu et al. 2024): the denoiser's hidden features at an early block, through a 3-layer SiLU
    MLP projector, aligned to the frozen SSL encoder's representation of the clean image by negative
    cosine similarity, added to the diffusion loss with weight lambda; the projector is dropped after
    training. The paper aligns patch tokens to DINOv2's patch features; here the grid is tiny (4x4
    latents: a DiT/2 has 4 tokens, the U-Net's bottom level is 2x2) and the encoder's per-image
    embedding is already computed, so the hidden features are mean-pooled over the grid and aligned
    to that embedding."""

    weight: float = Field(0.0, ge=0, le=100, description="lambda, the alignment term's weight (the paper's 0.5); 0 turns REPA off, the default: on the smoke profile it helped the DiT's FID but not the U-Net's")
    depth: int = Field(2, ge=1, le=64, description="the residual block whose output is aligned, counted from the input (a DiT's transformer blocks; the U-Net's ResBlocks down, middle, up). The paper aligns an early block (8 of SiT-XL's 28) and leaves the rest to turn the representation into the output: 2 is the U-Net's first block at its bottom (2x2) level, the end of its encoder half, and the DiT's second of 4")
    projector_dim: int = Field(256, ge=8, le=4096, description="hidden width of the projector's 3-layer SiLU MLP (the paper's 2048, scaled down for a CPU)")


class FlowParams(Strict):
    time_mean: float = Field(0.0, description="logit-normal t: sigmoid(N(time_mean, time_std^2))")
    time_std: float = Field(1.0, gt=0)
    sampler: Literal["euler", "heun"] = Field("euler", description="heun takes 2 net calls a step")


class DDPMParams(Strict):
    sampler: Literal["ddim", "ancestral"] = "ddim"


class EDMParams(Strict):
    """Karras et al. 2022's defaults, except sigma_data (see its description)."""

    p_mean: float = Field(-1.2, description="training ln(sigma) ~ N(p_mean, p_std^2)")
    p_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(1.0, gt=0, description="the data's std for the preconditioning: 1.0 because the latents are scaled to unit variance per channel (the paper's 0.5 is the std of images in [-1, 1])")
    sigma_min: float = Field(0.002, gt=0, description="the rho-schedule's last noise level before 0")
    sigma_max: float = Field(80.0, gt=0, description="the rho-schedule's first noise level: sampling starts from N(0, sigma_max^2)")
    rho: float = Field(7.0, gt=0, description="schedule curvature: higher crowds the steps at low sigma")
    sampler: Literal["heun", "sde"] = Field("heun", description="heun: the probability-flow ODE, 2 steps - 1 net calls; sde: Euler-Maruyama on the reverse-time SDE, 1 call a step")
    churn: float | None = Field(None, ge=0, description="sde only: null = Anderson's reverse-time SDE; a number = EDM's S_churn, Langevin share min(churn / steps, sqrt(2) - 1) a step (0: the Euler ODE)")

    @model_validator(mode="after")
    def _sigma_range(self) -> EDMParams:
        if self.sigma_min >= self.sigma_max:
            raise ValueError("sigma_min must be below sigma_max")
        return self


class NoisyClassifierParams(Strict):
    """Classifier guidance's classifier (Dhariwal & Nichol 2021): the U-Net's down half on latents noised
    as the teacher's formulation noises them, at levels spread evenly over what its samplers visit
    (models/guidance.py), trained after the denoiser. epochs 0 trains none: no cost, no file."""

    epochs: float = Field(0.0, ge=0, description="passes over the training latents; 0 (the default) trains no classifier, and fid scores no classifier guidance")
    channels: int = Field(32, ge=4, le=1024, description="width of its first level")
    channel_mults: list[int] = Field([1, 2], min_length=1, max_length=6, description="width of each level / channels; each next level halves the grid")
    blocks_per_level: int = Field(1, ge=1, le=8, description="time-conditioned residual blocks per level")
    batch_size: int = Field(128, ge=2, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)

    def train(self) -> TrainParams:
        """The training loop's params: AdamW at lr, the loop's defaults otherwise, no EMA."""
        return TrainParams(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, log_every=20)


class DiffusionParams(Strict):
    """A class-conditional denoiser (a U-Net or a DiT) over the VAE's latents: rectified flow, DDPM or EDM, with CFG."""

    formulation: Literal["flow", "ddpm", "edm"] = Field("flow", description="flow: v-prediction, logit-normal t; ddpm: eps-prediction, cosine schedule; edm: preconditioned x0-prediction, log-normal sigma")
    flow: FlowParams = FlowParams()
    ddpm: DDPMParams = DDPMParams()
    edm: EDMParams = EDMParams()
    backbone: Literal["unet", "dit"] = Field("unet", description="the denoiser network: unet (the unet block), or dit, a Diffusion Transformer (Peebles & Xie 2023; the dit block)")
    condition: Literal["class", "text"] = Field("class", description="class: the label, embedded and added to the time's embedding; text: the image's caption (prepare's), through cross-attention to the clip stage's frozen text encoder's token features (the unet's cross_attention_levels); the empty caption is CFG's null")
    unet: UNetParams = UNetParams()
    dit: DiTParams = DiTParams()
    label_dropout: float = Field(0.1, ge=0, lt=1, description="share of labels swapped for the null class (classifier-free guidance)")
    repa: RepaParams = RepaParams()
    classifier: NoisyClassifierParams = NoisyClassifierParams()
    train: TrainParams = TrainParams(epochs=8, batch_size=128, lr=1e-3, ema_decay=0.995, log_every=20)
    sample_steps: int = Field(32, ge=1, le=1000, description="sampler steps of the sample grids")
    guidance_scales: list[float] = Field([1.0, 2.0, 4.0], min_length=1, description="a sample grid per scale; 1 is the plain conditional model")
    samples_per_class: int = Field(8, ge=1, le=64, description="columns of each sample grid")
    caption_grid_class: int = Field(2, ge=0, description="condition: text: the class whose captions make the sample grids' rows, each attribute's three words in turn (the others at their middle word)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _guidance_at_least_one(self) -> DiffusionParams:
        if any(scale < 1 for scale in self.guidance_scales):
            raise ValueError("guidance_scales must be >= 1")
        return self

    @model_validator(mode="after")
    def _text_on_a_unet_without_a_classifier(self) -> DiffusionParams:
        if self.condition == "text" and self.backbone != "unet":
            raise ValueError("condition: text needs backbone: unet (the DiT has no cross-attention here)")
        if self.condition == "text" and self.classifier.epochs > 0:
            raise ValueError("condition: text takes no classifier.epochs: classifier guidance steers towards a class, a text-conditioned teacher is asked for a caption")
        unet = self.unet
        if self.condition == "text" and any(not 0 <= level < len(unet.channel_mults) for level in unet.cross_attention_levels):
            raise ValueError(f"unet.cross_attention_levels must name levels 0 to {len(unet.channel_mults) - 1} (one per unet.channel_mults entry)")
        if self.condition == "text" and any((unet.channels * unet.channel_mults[level]) % unet.attention_heads for level in unet.cross_attention_levels):
            raise ValueError("unet.attention_heads must divide the width (channels * channel_mults) of each unet.cross_attention_levels level")
        return self

    @model_validator(mode="after")
    def _repa_depth_within_the_net(self) -> DiffusionParams:
        unet = self.unet
        blocks = self.dit.depth if self.backbone == "dit" else len(unet.channel_mults) * (2 * unet.blocks_per_level + 1) + 2
        if self.repa.weight > 0 and self.repa.depth > blocks:
            raise ValueError(f"repa.depth must be at most the {self.backbone}'s {blocks} residual blocks")
        return self


class GanNetParams(Strict):
    noise_dim: int = Field(64, ge=1, le=4096, description="the generator's noise (its class embedding is as wide)")
    hidden: int = Field(256, ge=8, le=8192, description="width of both MLPs")
    depth: int = Field(3, ge=1, le=16, description="hidden layers of each MLP")


class GanParams(Strict):
    """A class-conditional WGAN-GP (Gulrajani et al. 2017) in the diffusion stage's latent space: the
    baseline diffusion replaced. penalty_weight, critic_steps, lr and adam_betas are the paper's
    defaults (its Algorithm 1): a weight of 10 keeps the critic near 1-Lipschitz on every dataset it
    tried, and beta1 = 0 because momentum lags the moving target the other network is. 70 epochs
    train it about as long as the diffusion teacher trains on the default profile (138 s against
    142 s on a 2-core CPU), so the FID table compares the two at equal training time."""

    net: GanNetParams = GanNetParams()
    penalty_weight: float = Field(10.0, ge=0, description="lambda: the gradient penalty's weight in the critic's loss")
    critic_steps: int = Field(5, ge=1, le=100, description="n_critic: critic updates per generator update")
    adam_betas: list[float] = Field([0.0, 0.9], min_length=2, max_length=2, description="Adam's (beta1, beta2) for both networks")
    train: TrainParams = TrainParams(
        epochs=70, batch_size=256, lr=1e-4, warmup_fraction=0.0, min_lr_ratio=1.0, grad_clip=None, log_every=60,
        checkpoint_every=3000, channels_last=False,
    )
    samples_per_class: int = Field(8, ge=1, le=64, description="columns of the sample grid")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _adam_only(self) -> GanParams:
        if self.train.optimizer != "adamw":
            raise ValueError("train.optimizer must be adamw: adam_betas set its betas")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError("adam_betas must lie in [0, 1)")
        return self


class TransformerParams(Strict):
    """What a stage's transformer params share: its `heads` must divide its `dim`."""

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> TransformerParams:
        if self.dim % self.heads:
            raise ValueError("heads must divide dim")
        return self


class ArParams(TransformerParams):
    """A class-conditional autoregressive prior over the VQ-VAE's codes (the transformer of VQGAN,
    Esser et al. 2021, in miniature): a GPT-style causal decoder over the code grid in raster
    order. It trains only when vae.regulariser is vq; with a continuous latent the stage writes
    that it skipped, at no cost."""

    dim: int = Field(128, ge=8, le=4096, description="width of the transformer")
    depth: int = Field(4, ge=1, le=48, description="transformer blocks (pre-LN, causal self-attention)")
    heads: int = Field(4, ge=1, le=64, description="attention heads; must divide dim")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the embeddings, attention and MLP outputs in training")
    temperature: float = Field(1.0, ge=0, le=10, description="sampling temperature; 0 takes the most likely code at each place")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely codes at each place; null: all of the codebook")
    train: TrainParams = TrainParams(
        epochs=3, batch_size=128, lr=1e-3, weight_decay=0.01, log_every=20, checkpoint_every=2000, channels_last=False,
    )
    samples_per_class: int = Field(8, ge=1, le=64, description="columns of the sample grid")
    seed: int = Field(0, ge=0)


class ClipParams(TransformerParams):
    """CLIP (Radford et al. 2021) in miniature on prepare's captions: a ResNet image encoder and a
    transformer text encoder trained by the symmetric InfoNCE loss with a learned temperature
    (initialised to 0.07, the logits' scale clamped at 100, as in the paper)."""

    image: ResNetParams = Field(
        ResNetParams(width=16, depth=[1, 1]),
        description="the image encoder, a ResNet as in ssl (CLIP: ResNet-50 and up, or a ViT)",
    )
    dim: int = Field(64, ge=8, le=4096, description="width of the text transformer (CLIP: 512)")
    depth: int = Field(2, ge=1, le=48, description="text transformer blocks, pre-LN (CLIP: 12)")
    heads: int = Field(4, ge=1, le=64, description="text attention heads; must divide dim (CLIP: 8)")
    embed_dim: int = Field(64, ge=8, le=4096, description="the shared embedding both encoders project to (CLIP: 512 to 1024)")
    train: TrainParams = Field(
        TrainParams(epochs=2, batch_size=256, lr=1e-3, weight_decay=0.2, log_every=20, checkpoint_every=2000),
        description="CLIP: AdamW, weight decay 0.2, warmup then cosine, batch 32,768",
    )
    retrieval_images: int = Field(8, ge=1, le=64, description="test images in plots/clip/retrieval.png, each beside its top-3 captions")
    seed: int = Field(0, ge=0)


class ProgressiveParams(Strict):
    teacher_steps: int = Field(64, ge=2, le=1024, description="DDIM steps of the first round's teacher; a power of two, halved each round")
    label_dropout: float = Field(0.1, ge=0, lt=1, description="null-class share for teacher and student alike: students keep guidance")
    train: TrainParams = TrainParams(epochs=5, batch_size=128, lr=1e-3, warmup_fraction=0.0, log_every=20)


class ReflowParams(Strict):
    pairs: int = Field(4096, ge=16, description="(noise, teacher sample) pairs the student straightens")
    sampler: Literal["heun", "own"] = Field("heun", description="the teacher's sampler drawing the pairs: heun (second order, 2 network calls a step; Liu et al. 2022 draw theirs with RK45, a higher-order ODE solver), or its own (a flow's Euler)")
    teacher_steps: int = Field(8, ge=1, le=1000, description="sampler steps drawing the pairs")
    # lr 2e-3: the 4-step student's FID on the default profile was 0.213 at 5e-4, 0.199 at 1e-3, 0.190 at 2e-3;
    # then 30 epochs: 0.176 (1.17x the teacher's best), against 0.181 for twice the pairs and 0.200 with an EMA of 0.995
    train: TrainParams = TrainParams(epochs=30, batch_size=128, lr=2e-3, warmup_fraction=0.0, log_every=20)


class ConsistencyParams(Strict):
    levels: int = Field(18, ge=2, le=1000, description="N: noise levels of the rho-schedule the student is made consistent across (Song et al. 2023: 18 with an EDM teacher)")
    target_decay: float = Field(0.95, ge=0, lt=1, description="mu: the target network's EMA of the student (Song et al. 2023)")
    train: TrainParams = TrainParams(epochs=20, batch_size=128, lr=4e-4, warmup_fraction=0.0, log_every=20)


class DistillParams(Strict):
    """Few-step students of the diffusion teacher: progressive distillation (DDPM), reflow (flow,
    EDM) or consistency distillation (EDM)."""

    method: Literal["auto", "consistency"] = Field("auto", description="auto: progressive for a ddpm teacher, reflow for flow and edm; consistency: consistency distillation of an edm teacher")
    guidance: float = Field(2.0, ge=1, description="the teacher's guidance the students reproduce (and fid samples the teacher at)")
    student_steps: list[int] = Field([1, 2, 4], min_length=1, description="steps the students sample with")
    progressive: ProgressiveParams = ProgressiveParams()
    reflow: ReflowParams = ReflowParams()
    consistency: ConsistencyParams = ConsistencyParams()
    samples_per_class: int = Field(8, ge=1, le=64, description="columns of each student's sample grid")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _students_come_from_the_rounds(self) -> DistillParams:
        teacher_steps = self.progressive.teacher_steps
        if teacher_steps & (teacher_steps - 1):
            raise ValueError("progressive.teacher_steps must be a power of two")
        if any(steps < 1 or steps & (steps - 1) or steps >= teacher_steps for steps in self.student_steps):
            raise ValueError("student_steps must be powers of two below progressive.teacher_steps (one per round)")
        return self


class RequestParams(Strict):
    """Does a guided sample follow its request? The teacher sampled at each guidance scale, its
    images classified by the probe on the SSL encoder's features (artifacts/probe), with FID beside."""

    samples: int = Field(2000, ge=10, description="generated images per guidance scale, class-balanced; each judged by the probe")
    steps: int = Field(8, ge=1, le=1000, description="the teacher's own sampler's steps at every scale")
    cfg_scales: list[float] = Field([1.0, 2.0, 4.0], min_length=1, description="classifier-free guidance scales w (1: the plain conditional model)")
    classifier_scales: list[float] = Field([1.0, 3.0, 10.0], description="classifier guidance scales s on the conditional model (0: the plain conditional model), scored when the diffusion stage trained a classifier (diffusion.classifier.epochs > 0)")

    @model_validator(mode="after")
    def _scales_in_range(self) -> RequestParams:
        if any(scale < 1 for scale in self.cfg_scales) or any(scale < 0 for scale in self.classifier_scales):
            raise ValueError("guidance.cfg_scales must be >= 1 and guidance.classifier_scales >= 0")
        return self


class FidParams(Strict):
    """FID and KID against the test split in the frozen SSL encoder's feature space."""

    samples: int = Field(2000, ge=10, description="generated images per row, class-balanced")
    teacher_steps: list[int] = Field([1, 2, 4, 8, 16, 32], min_length=1, description="the teacher's sampler steps, a row each")
    samplers: list[Literal["euler", "heun", "ddim", "ancestral", "sde"]] = Field(
        ["euler", "heun", "ddim"],
        description="samplers the teacher is scored with beside its own (rows teacher_<sampler>.steps_N), those that apply to its formulation (flow: euler, heun; ddpm: ddim, ancestral; edm: heun, sde), at the teacher_steps that cost no more network evaluations than its own sampler's most; default: the ODE samplers",
    )
    guidance: RequestParams = RequestParams()
    inversion_steps: list[int] = Field([4, 16], description="DDIM inversion of `samples` test latents to noise and back with the teacher's deterministic sampler, at each step count; [] skips it")
    kid_subset_size: int = Field(100, ge=2, description="KID subset size, capped by the smaller image set")
    kid_subsets: int = Field(50, ge=1)
    batch_size: int = Field(500, ge=1, description="images sampled and scored at once")
    samples_per_class: int = Field(8, ge=1, le=64, description="columns of each sample grid")
    inception: bool = Field(True, description="Inception-v3 FID too, when torch-fidelity and its weights are on disk (never downloaded)")
    inception_weights: str | None = Field(None, description="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; default: in torch hub's checkpoints folder")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _steps_positive(self) -> FidParams:
        if any(steps < 1 for steps in self.teacher_steps + self.inversion_steps):
            raise ValueError("teacher_steps and inversion_steps must be >= 1")
        return self


STAGE_PARAMS: dict[str, type[Strict]] = {
    "prepare": PrepareParams,
    "ssl": SslParams,
    "encoder": EncoderParams,
    "probe": ProbeParams,
    "kd": KdParams,
    "clip": ClipParams,
    "vae": VaeParams,
    "diffusion": DiffusionParams,
    "gan": GanParams,
    "ar": ArParams,
    "distill": DistillParams,
    "fid": FidParams,
}


def params_path(stage: str) -> Path:
    return PARAMS_DIR / f"{stage}.yaml"


def read_yaml(path: Path) -> dict:
    """A params or profile file's mapping; an empty file is refused (it would silently mean every default)."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.MarkedYAMLError as err:
        where = f" at line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}" if err.problem_mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {err.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot be read ({err.strerror})") from None
    if data is None:
        raise ParamsError(f"{path}: empty; expected the stage's keys (`python -m flows profile default` writes every params file)")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """The keys allowed at the parent of `loc`, for 'unknown key' messages."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return ", ".join(model.model_fields)


def describe_errors(path: Path, model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: file, dotted key, bad value, what is allowed."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        value = problem.get("input")
        if not key:  # a rule across several keys
            lines.append(f"{path}: {problem['msg'].removeprefix('Value error, ')}")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key '{key}'; allowed keys: {_allowed(model, problem['loc'])}")
        else:
            lines.append(f"{path}: key '{key}' = {value!r} is invalid: {problem['msg']}")
    return "\n".join(lines)


def validate(stage: str, data: dict, path: Path | None = None) -> Strict:
    """Validate a stage's raw mapping into its typed model, or raise ParamsError."""
    if stage not in STAGE_PARAMS:
        raise ParamsError(f"unknown stage '{stage}'; stages: {', '.join(STAGE_PARAMS)}")
    model = STAGE_PARAMS[stage]
    path = path or params_path(stage)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as err:
        raise ParamsError(describe_errors(path, model, err)) from None


def load_params(stage: str) -> Strict:
    """Read and validate params/<stage>.yaml."""
    path = params_path(stage)
    return validate(stage, read_yaml(path), path)


def processes(params: BaseModel) -> int:
    """How many torchrun processes a stage's params ask for: the most any of its `train` blocks asks."""
    found = [params.processes] if isinstance(params, TrainParams) else []
    found += [processes(value) for value in dict(params).values() if isinstance(value, BaseModel)]
    return max(found, default=1)


def flatten(params: BaseModel | dict, prefix: str = "") -> dict[str, object]:
    """`{prefix.key.sub: value}` of params or of a nested mapping (`{key.sub: value}` without a prefix)."""
    out: dict[str, object] = {}

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = node

    walk(params.model_dump(mode="json") if isinstance(params, BaseModel) else params, prefix)
    return out
