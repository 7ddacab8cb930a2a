# batchscope: profile the hardware, train across batch sizes, fit the scaling model, report.
# Table of contents only; rules live in workflow/rules/, the computation in src/batchscope/.
from snakemake.utils import min_version

from batchscope.config import DEFAULT_CONFIG

min_version("9.0")


# The default study runs only when no --configfile is given: a user's file replaces it rather than being
# deep-merged into it (a merge would add the default workload to every study).
if not workflow.config_settings.configfiles:

    configfile: DEFAULT_CONFIG


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/hessian.smk"
include: "workflow/rules/ghost.smk"
include: "workflow/rules/noise.smk"
include: "workflow/rules/quick.smk"
include: "workflow/rules/adaptive.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.render_report.output.html,
    localrule: True
