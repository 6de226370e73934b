"""Network: the VPC the compute and FSx live in, and their security groups.

Private subnets over >= 2 AZs (awsx builds subnets, routes and NAT), an S3
gateway endpoint on every route table so image traffic to the bucket never
pays NAT data charges, a compute group whose only inbound traffic is Lustre
from the file servers, and an FSx group that admits Lustre traffic (TCP 988,
1018-1023) only from the compute group and itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws
import pulumi_awsx as awsx

# Ports FSx for Lustre serves on (AWS: "Amazon VPC security groups" for FSx for Lustre).
LUSTRE_PORT_RANGES: tuple[tuple[int, int], ...] = ((988, 988), (1018, 1023))


@dataclass
class NetworkArgs:
    """What the network needs to know."""

    cidr_block: str
    availability_zones: int
    nat_strategy: str  # "Single" | "OnePerAz"
    s3_endpoint_service: str  # Partition.s3_gateway_endpoint_service(region), e.g. com.amazonaws.eu-west-1.s3


def lustre_ingress_rules(compute_group_id: pulumi.Input[str]) -> list[aws.ec2.SecurityGroupIngressArgs]:
    """Lustre ports, each from the compute group and from the FSx group itself (servers talk to each other)."""
    return [
        aws.ec2.SecurityGroupIngressArgs(
            description=f"Lustre {low}-{high} from compute and FSx servers",
            protocol="tcp", from_port=low, to_port=high,
            security_groups=[compute_group_id], self=True)
        for low, high in LUSTRE_PORT_RANGES
    ]


class Network(pulumi.ComponentResource):
    """VPC, private subnets, S3 gateway endpoint and the two security groups."""

    vpc_id: pulumi.Output[str]
    private_subnet_ids: pulumi.Output[Sequence[str]]
    compute_security_group_id: pulumi.Output[str]
    fsx_security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        vpc = awsx.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr_block,
            number_of_availability_zones=args.availability_zones,
            enable_dns_hostnames=True,  # FSx and ECR/Batch endpoints resolve by DNS name
            enable_dns_support=True,
            subnet_strategy=awsx.ec2.SubnetAllocationStrategy.AUTO,
            subnet_specs=[
                awsx.ec2.SubnetSpecArgs(type=awsx.ec2.SubnetType.PRIVATE),
                awsx.ec2.SubnetSpecArgs(type=awsx.ec2.SubnetType.PUBLIC),  # holds only the NAT gateway(s)
            ],
            nat_gateways=awsx.ec2.NatGatewayConfigurationArgs(
                strategy=awsx.ec2.NatGatewayStrategy(args.nat_strategy)),
            opts=child,
        )
        # awsx does not attach gateway endpoints to its route tables (pulumi-awsx#1627),
        # so the endpoint is declared here with every route table of the VPC.
        route_table_ids = vpc.route_tables.apply(
            lambda tables: pulumi.Output.all(*[table.id for table in tables or []]))
        s3_endpoint = aws.ec2.VpcEndpoint(
            f"{name}-s3-endpoint",
            vpc_id=vpc.vpc_id,
            service_name=args.s3_endpoint_service,
            vpc_endpoint_type="Gateway",
            route_table_ids=route_table_ids,
            opts=child,
        )
        compute_sg = aws.ec2.SecurityGroup(
            f"{name}-compute-sg",
            description="Batch compute instances: no inbound, outbound to AWS APIs, S3 and FSx",
            vpc_id=vpc.vpc_id,
            egress=[aws.ec2.SecurityGroupEgressArgs(
                description="AWS APIs (via NAT), S3 (via gateway endpoint), FSx",
                protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"])],
            opts=child,
        )
        fsx_sg = aws.ec2.SecurityGroup(
            f"{name}-fsx-sg",
            description="FSx for Lustre: Lustre ports from the compute group and itself only",
            vpc_id=vpc.vpc_id,
            ingress=lustre_ingress_rules(compute_sg.id),
            egress=[aws.ec2.SecurityGroupEgressArgs(
                description="replies and server-to-server traffic inside the VPC only",
                protocol="-1", from_port=0, to_port=0, cidr_blocks=[args.cidr_block])],
            opts=child,
        )

        # Lustre clients also listen on the Lustre ports: the file servers connect back to them (lock
        # callbacks, reconnects), and AWS's client security-group rules admit those ports from the file
        # system's group. A separate rule resource, because the FSx group already names this group.
        for low, high in LUSTRE_PORT_RANGES:
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-compute-lustre-{low}",
                description=f"Lustre {low}-{high} from the FSx file servers only",
                security_group_id=compute_sg.id,
                referenced_security_group_id=fsx_sg.id,
                ip_protocol="tcp", from_port=low, to_port=high,
                opts=child,
            )

        self.vpc_id = vpc.vpc_id
        self.private_subnet_ids = vpc.private_subnet_ids
        self.compute_security_group_id = compute_sg.id
        self.fsx_security_group_id = fsx_sg.id
        self.s3_endpoint_id = s3_endpoint.id
        self.register_outputs({
            "vpcId": self.vpc_id,
            "privateSubnetIds": self.private_subnet_ids,
            "computeSecurityGroupId": self.compute_security_group_id,
            "fsxSecurityGroupId": self.fsx_security_group_id,
            "s3EndpointId": self.s3_endpoint_id,
        })
