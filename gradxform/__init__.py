"""gradxform: composable, optax-compatible gradient transformations for stable training.

Every factory returns an `optax.GradientTransformationExtraArgs`; gradxform and optax
transforms mix freely in `gx.chain` / `optax.chain` and in optax's wrappers.
"""

from gradxform._base import EmptyState as EmptyState
from gradxform._base import GradientTransformation as GradientTransformation
from gradxform._base import GradientTransformationExtraArgs as GradientTransformationExtraArgs
from gradxform._base import chain as chain
from gradxform._records import ClipRecord as ClipRecord
from gradxform._tree import global_norm as global_norm
from gradxform.adaptive import ScaleByAdamState as ScaleByAdamState
from gradxform.adaptive import ScaleByAmsgradState as ScaleByAmsgradState
from gradxform.adaptive import ScaleByRmsState as ScaleByRmsState
from gradxform.adaptive import ScaleByRssState as ScaleByRssState
from gradxform.adaptive import ScaleByStddevState as ScaleByStddevState
from gradxform.adaptive import scale_by_adam as scale_by_adam
from gradxform.adaptive import scale_by_adamax as scale_by_adamax
from gradxform.adaptive import scale_by_amsgrad as scale_by_amsgrad
from gradxform.adaptive import scale_by_rms as scale_by_rms
from gradxform.adaptive import scale_by_rss as scale_by_rss
from gradxform.adaptive import scale_by_stddev as scale_by_stddev
from gradxform.adaptive_clipping import AutoClipState as AutoClipState
from gradxform.adaptive_clipping import ScaleBySpamState as ScaleBySpamState
from gradxform.adaptive_clipping import ZClipState as ZClipState
from gradxform.adaptive_clipping import autoclip as autoclip
from gradxform.adaptive_clipping import scale_by_spam as scale_by_spam
from gradxform.adaptive_clipping import zclip as zclip
from gradxform.clipping import AdaptiveGradClipState as AdaptiveGradClipState
from gradxform.clipping import ClipState as ClipState
from gradxform.clipping import adaptive_grad_clip as adaptive_grad_clip
from gradxform.clipping import clip as clip
from gradxform.clipping import clip_by_block_rms as clip_by_block_rms
from gradxform.clipping import clip_by_global_norm as clip_by_global_norm
from gradxform.clipping import clip_by_leaf_norm as clip_by_leaf_norm
from gradxform.decay import AddDecayedWeightsState as AddDecayedWeightsState
from gradxform.decay import add_decayed_weights as add_decayed_weights
from gradxform.decay import add_l1_decay as add_l1_decay
from gradxform.decay import weight_decay_mask as weight_decay_mask
from gradxform.guards import DynamicLossScaleState as DynamicLossScaleState
from gradxform.guards import SkipIfState as SkipIfState
from gradxform.guards import dynamic_loss_scale as dynamic_loss_scale
from gradxform.guards import loss_scale as loss_scale
from gradxform.guards import scale_loss as scale_loss
from gradxform.guards import skip_if as skip_if
from gradxform.guards import stable as stable
from gradxform.lbfgs import LbfgsRecord as LbfgsRecord
from gradxform.lbfgs import LinesearchRecord as LinesearchRecord
from gradxform.lbfgs import ScaleByFiniteZoomLinesearchState as ScaleByFiniteZoomLinesearchState
from gradxform.lbfgs import ScaleByLbfgsState as ScaleByLbfgsState
from gradxform.lbfgs import lbfgs as lbfgs
from gradxform.lbfgs import scale_by_finite_zoom_linesearch as scale_by_finite_zoom_linesearch
from gradxform.lbfgs import scale_by_lbfgs as scale_by_lbfgs
from gradxform.learning_rate import ScaleByScheduleState as ScaleByScheduleState
from gradxform.learning_rate import scale as scale
from gradxform.learning_rate import scale_by_learning_rate as scale_by_learning_rate
from gradxform.learning_rate import scale_by_schedule as scale_by_schedule
from gradxform.minimize import MinimizeResult as MinimizeResult
from gradxform.minimize import minimize as minimize
from gradxform.momentum import EmaState as EmaState
from gradxform.momentum import TraceState as TraceState
from gradxform.momentum import ema as ema
from gradxform.momentum import trace as trace
from gradxform.noise import AddNoiseState as AddNoiseState
from gradxform.noise import add_noise as add_noise
from gradxform.optimizers import adagrad as adagrad
from gradxform.optimizers import adam as adam
from gradxform.optimizers import adamax as adamax
from gradxform.optimizers import adamw as adamw
from gradxform.optimizers import amsgrad as amsgrad
from gradxform.optimizers import nadam as nadam
from gradxform.optimizers import rmsprop as rmsprop
from gradxform.optimizers import sgd as sgd
from gradxform.plots import plot_health as plot_health
from gradxform.telemetry import GradientExplosionError as GradientExplosionError
from gradxform.telemetry import GradientHealthError as GradientHealthError
from gradxform.telemetry import HealthState as HealthState
from gradxform.telemetry import NonFiniteGradientError as NonFiniteGradientError
from gradxform.telemetry import StalledTrainingError as StalledTrainingError
from gradxform.telemetry import VanishingGradientError as VanishingGradientError
from gradxform.telemetry import assert_healthy as assert_healthy
from gradxform.telemetry import check_healthy as check_healthy
from gradxform.telemetry import health as health
from gradxform.telemetry import read_health as read_health
from gradxform.telemetry import telemetry_records as telemetry_records

__version__ = "0.1.0"
