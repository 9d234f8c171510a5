#!/usr/bin/env python3
"""Validates the deployment that the CDK app synthesises: every template with cfn-lint, and every
state machine (ASL) with the Amazon States Language schema that cfn-lint ships (the one it checks
inline definitions with), plus the structure the schema cannot express: every transition names a
state, every state is reachable, every non-terminal state goes on, task heartbeats are shorter
than their timeouts, and the ${...} placeholders match the machine's DefinitionSubstitutions.
Each machine's definition must be one of batch/statemachines/*.asl.json, as it is, and each of
those files must be deployed.

Usage: batch/validate.py CLOUD_ASSEMBLY  (the directory `cdk synth` or `CDK_OUTDIR=... python3
app.py` writes; needs cfn-lint: pip install cfn-lint)"""

import json
import pathlib
import re
import subprocess
import sys

import cfnlint.data.schemas.other.step_functions as sfn_schemas
import jsonschema

HERE = pathlib.Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def transitions(state):
    """The states a state can go to."""
    targets = [state.get("Next"), state.get("Default")]
    targets += [c.get("Next") for c in state.get("Choices", [])]
    targets += [c.get("Next") for c in state.get("Catch", [])]
    return [t for t in targets if t]


def check_states(machine, where, errors):
    states = machine["States"]
    if machine["StartAt"] not in states:
        errors.append(f"{where}: StartAt {machine['StartAt']!r} is not a state")
    seen, todo = set(), [machine["StartAt"]]
    while todo:
        name = todo.pop()
        if name in seen or name not in states:
            continue
        seen.add(name)
        todo += transitions(states[name])
    for name, state in states.items():
        here = f"{where}.{name}"
        if name not in seen:
            errors.append(f"{here}: unreachable")
        for target in transitions(state):
            if target not in states:
                errors.append(f"{here}: goes to {target!r}, which is not a state")
        terminal = state["Type"] in ("Succeed", "Fail", "Choice") or state.get("End")
        if not terminal and "Next" not in state:
            errors.append(f"{here}: neither Next nor End")
        hb, timeout = state.get("HeartbeatSeconds"), state.get("TimeoutSeconds")
        if hb is not None and timeout is not None and hb >= timeout:
            errors.append(f"{here}: HeartbeatSeconds {hb} >= TimeoutSeconds {timeout}")
        for nested in ("ItemProcessor", "Iterator"):
            if nested in state:
                check_states(state[nested], f"{here}.{nested}", errors)
        for i, branch in enumerate(state.get("Branches", [])):
            check_states(branch, f"{here}.Branches[{i}]", errors)


# CDK gives a resource an explicit DependsOn on a role's policy that a GetAtt already implies.
IGNORED_CHECKS = ["W3005"]


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    assembly = pathlib.Path(sys.argv[1])
    templates = sorted(assembly.glob("*.template.json"))
    if not templates:
        print(f"error: no *.template.json in {assembly}", file=sys.stderr)
        return 1
    lint = subprocess.run(
        [sys.executable, "-c", "import sys, cfnlint.runner; sys.exit(cfnlint.runner.main())",
         "--ignore-checks", *IGNORED_CHECKS, "--", *map(str, templates)]
    )
    errors = [] if lint.returncode == 0 else ["cfn-lint found problems (above)"]

    schema = json.loads(
        pathlib.Path(sfn_schemas.__file__).with_name("statemachine.json").read_text()
    )
    files = {p.read_text(): p.name for p in (HERE / "statemachines").glob("*.asl.json")}
    machines, deployed = 0, set()
    for template_path in templates:
        template = json.loads(template_path.read_text())
        for name, res in template.get("Resources", {}).items():
            if res["Type"] != "AWS::StepFunctions::StateMachine":
                continue
            machines += 1
            props = res["Properties"]
            where = f"{template_path.name} {name}"
            text = props.get("DefinitionString")
            if not isinstance(text, str) or text not in files:
                errors.append(f"{where}: its definition is not one of batch/statemachines/*.asl.json")
                continue
            deployed.add(files[text])
            where = f"{where} ({files[text]})"
            used = set(PLACEHOLDER.findall(text))
            given = set(props.get("DefinitionSubstitutions", {}))
            if used != given:
                errors.append(f"{where}: placeholders {sorted(used)} but substitutions {sorted(given)}")
            definition = json.loads(
                PLACEHOLDER.sub(lambda m: f"arn:aws:states:us-east-1:123456789012:activity:{m[1]}", text)
            )
            # Draft 2020-12: the schema puts keywords beside "$ref", which Draft 7 would ignore.
            found = list(jsonschema.Draft202012Validator(schema).iter_errors(definition))
            for e in found:
                errors.append(f"{where}: {'/'.join(map(str, e.path))}: {e.message}")
            if not found:
                check_states(definition, files[text], errors)
    for name in sorted(set(files.values()) - deployed):
        errors.append(f"{name}: no state machine of the app deploys it")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{len(templates)} templates linted, {machines} state machines checked, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
