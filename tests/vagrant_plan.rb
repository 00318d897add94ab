# What the Vagrantfile in ARGV[0] asks of each machine, for PROVIDER (ARGV[1]), as JSON on
# stdout: read through Vagrant's own loader (tests/test_vagrant.py), with no VM and no network.
require "json"
require "vagrant"

dir, provider = ARGV.fetch(0), ARGV.fetch(1).to_sym
Vagrant::Plugin::Manager.instance.load_plugins(Vagrant::Plugin::Manager.instance.installed_plugins)
env = Vagrant::Environment.new(cwd: dir, ui_class: Vagrant::UI::Silent)
plan = env.machine_names.map do |name|
  config = env.vagrantfile.machine_config(name, provider, env.boxes, nil, false)[:config]
  vm = config.vm
  provider_config = vm.get_provider_config(provider)
  {
    name: name.to_s,
    box: vm.box,
    hostname: vm.hostname,
    private_networks: vm.networks.select { |type, _| type == :private_network }
                                 .map { |_, options| options[:ip] },
    synced_folders: vm.synced_folders.values.reject { |f| f[:disabled] }
                                     .map { |f| { guest: f[:guestpath], type: f[:type].to_s } },
    provisioners: vm.provisioners.map do |p|
      { name: p.name.to_s, type: p.type.to_s, path: p.config.path, args: p.config.args || [] }
    end,
    after_triggers: config.trigger.after_triggers.map { |t| t.command.to_s },
    provider: %i[driver cpu_mode cpu_model memory cpus].to_h do |key|
      value = provider_config.instance_variable_get("@#{key}")
      [key, value.is_a?(Symbol) || value.nil? ? nil : value]
    end,
  }
end
puts JSON.generate(plan)
