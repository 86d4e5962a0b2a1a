# An EC2 image with the falconet executor baked in: falconet in its own virtual environment
# (/opt/falconet), an unprivileged user `falconet`, and the systemd unit
# falconet-executor.service, which at boot reads the instance's user-data through IMDSv2,
# joins the dispatcher it names and pulls work.  Build: see ami/README.md.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Type of the temporary instance the image is built on."
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "x86_64 or arm64; pick an instance_type of the same architecture."
}

variable "base_ami_name" {
  type        = string
  default     = "debian-12-*"
  description = "Name pattern of the stock base image; the newest match is used."
}

variable "base_ami_owner" {
  type        = string
  default     = "136693071363"
  description = "Account that publishes the base image (136693071363: Debian)."
}

variable "ssh_username" {
  type    = string
  default = "admin"
}

variable "falconet_spec" {
  type        = string
  default     = "falconet"
  description = "What pip installs: a version (falconet==0.1.0), a wheel URL, or a path uploaded first."
}

variable "ami_name_prefix" {
  type    = string
  default = "falconet-executor"
}

variable "subnet_id" {
  type    = string
  default = ""
}

variable "skip_region_validation" {
  type        = bool
  default     = false
  description = "Only for offline checks (packer validate without AWS access)."
}

locals {
  stamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "executor" {
  region                 = var.region
  instance_type          = var.instance_type
  ssh_username           = var.ssh_username
  subnet_id              = var.subnet_id
  skip_region_validation = var.skip_region_validation
  ami_name               = "${var.ami_name_prefix}-${var.arch}-${local.stamp}"
  ami_description        = "falconet executor (${var.falconet_spec}) on ${var.base_ami_name}"

  source_ami_filter {
    filters = {
      name                  = var.base_ami_name
      architecture          = var.arch
      "virtualization-type" = "hvm"
      "root-device-type"    = "ebs"
    }
    owners      = [var.base_ami_owner]
    most_recent = true
  }

  tags = {
    Name                = "${var.ami_name_prefix}-${var.arch}"
    Role                = "falconet-executor"
    "falconet:version"  = var.falconet_spec
    "falconet:base-ami" = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.executor"]

  provisioner "file" {
    source      = "${path.root}/falconet-executor.service"
    destination = "/tmp/falconet-executor.service"
  }

  provisioner "file" {
    source      = "${path.root}/falconet-sudoers"
    destination = "/tmp/falconet-sudoers"
  }

  provisioner "shell" {
    script           = "${path.root}/install.sh"
    environment_vars = ["FALCONET_SPEC=${var.falconet_spec}"]
    execute_command  = "chmod +x {{ .Path }}; sudo -E sh -eu {{ .Path }}"
  }
}
