# The adaptive study (study: adaptive): after the quick estimate, a checkpoint per workload picks the batch sizes
# to train, a bracket of the grid around the quick b_opt (batchscope.stages.adaptive). Once the bracket is trained,
# a second checkpoint (extend_bracket, batchscope.stages.extend) adds the grid's next size past an edge of it that
# the fit on the bracket finds fastest beyond noise, or beyond which that fit predicts b_opt
# (batchscope.core.selection.extension). Their files hold the choices; the input functions of the fit, the Hessian
# stage and the cost tables read the second (trained_batch_sizes in common.smk), so only the chosen sizes' training
# jobs are scheduled.
checkpoint choose_batch_sizes:
    input:
        quick=rules.quick_estimate.output[0],
    output:
        "results/adaptive/{workload}.nc",
    log:
        "logs/choose_batch_sizes/{workload}.log",
    benchmark:
        "results/benchmarks/choose_batch_sizes/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("choose_batch_sizes"),
        version=CHECKPOINT_VERSIONS["choose_batch_sizes"],
        expect=expected_provenance("quick_estimate"),
    shell:
        "python -m batchscope choose-batch-sizes --spec {params.spec:q} --workload {wildcards.workload}"
        " --expect {params.expect:q} --quick {input.quick} --out {output} > {log} 2>&1"


checkpoint extend_bracket:
    input:
        choice=rules.choose_batch_sizes.output[0],
        profiles=profile_files,
        runs=bracket_train_dirs,
    output:
        "results/adaptive/{workload}.extended.nc",
    log:
        "logs/extend_bracket/{workload}.log",
    benchmark:
        "results/benchmarks/extend_bracket/{workload}.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        spec=config_slice("extend_bracket"),
        version=CHECKPOINT_VERSIONS["extend_bracket"],
        expect=expected_provenance("choose_batch_sizes", "profile_hardware", "train_model"),
    shell:
        "python -m batchscope extend-bracket --spec {params.spec:q} --workload {wildcards.workload}"
        " --expect {params.expect:q} --choice {input.choice} --profiles {input.profiles} --runs {input.runs}"
        " --out {output} > {log} 2>&1"
